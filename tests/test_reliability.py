"""Exact resume, whole checkpoints after SIGKILL, non-finite losses,
and one clear line per bad input."""

import argparse
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_pretrain
from tests.conftest import (
    MIMCO,
    MOCO,
    ROOT,
    TINY_MAE,
    TORCHRUN,
    epoch_losses,
    parse,
    run_script,
    train_epoch_on_cpu,
)
from util import checkpoint
from util.errors import InputError, one_line

SMALL = ['--warmup_epochs', '1', '--blr', '1e-3']


def train(argv, out, epochs):
    main_pretrain.main(parse(argv + SMALL + ['--epochs', str(epochs), '--output_dir', str(out)]))
    return checkpoint.load_file(os.path.join(out, 'checkpoint-last.pth'))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs after resume'


def die_then_resume(monkeypatch, script, run, out, epoch):
    """Runs `run(out)` once with the process dying as `epoch` starts (after the previous epoch's
    checkpoint), then once more: the second run resumes. Returns what the second run returns."""
    real = script.train_one_epoch

    def die_at_epoch(*args, **kwargs):
        called = inspect.signature(real).bind(*args, **kwargs).arguments
        if called['epoch'] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(script, 'train_one_epoch', die_at_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.setattr(script, 'train_one_epoch', real)
    return run(out)


@pytest.mark.parametrize(
    'method', ['mocov3', 'mimco', 'mae', pytest.param('mtl', marks=pytest.mark.slow)]
)  # mtl: 60 s on 2 shared cores
def test_resume_equals_uninterrupted(method, tmp_path, teacher_path):
    """Stopped after epoch 0 (its checkpoint is all that is left) and resumed: the same weights,
    optimizer state and RNG stream as the run that never stopped, with loader workers (which start
    once per run, so at another point of a resumed one)."""
    argv = ['--batch_size', '256', '--save_freq', '1']
    if method == 'mocov3':
        argv = MOCO + argv
    elif method == 'mae':
        argv = TINY_MAE + ['--num_workers', '0'] + argv
    elif method == 'mtl':  # MAE and MoCo v3 on one encoder: both heads small
        argv = MOCO + TINY_MAE[2:] + ['--method', 'mtl'] + argv
    else:
        argv = MIMCO + argv + ['--teacher', os.path.join(teacher_path, 'checkpoint-last.pth')]
    argv += ['--num_workers', '2']
    whole = train(argv, tmp_path / 'whole', 2)
    os.makedirs(tmp_path / 'split')
    shutil.copy(tmp_path / 'whole' / 'checkpoint-0.pth', tmp_path / 'split' / 'checkpoint-last.pth')
    resumed = train(argv, tmp_path / 'split', 2)
    assert resumed['epoch'] == whole['epoch'] == 1
    assert_same_weights(whole['model'], resumed['model'])
    assert_same_weights(whole['optimizer']['state'][0], resumed['optimizer']['state'][0])
    assert epoch_losses(tmp_path / 'split') == epoch_losses(tmp_path / 'whole')[1:]


def test_finetune_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Fine-tuning with Mixup/CutMix, an EMA and loader workers, stopped after epoch 0 and resumed:
    the same bits."""
    import main_finetune

    argv = [
        '--epochs',
        '2',
        '--warmup_epochs',
        '1',
        '--batch_size',
        '256',
        '--num_workers',
        '2',
        '--mixup',
        '0.8',
        '--cutmix',
        '1.0',
        '--model_ema',
        '--model_ema_decay',
        '0.9',
        '--print_freq',
        '100',
    ]

    def run(out):
        main_finetune.main(
            main_finetune.get_args_parser().parse_args(argv + ['--output_dir', str(out)])
        )

    run(tmp_path / 'whole')
    die_then_resume(monkeypatch, main_finetune, run, tmp_path / 'split', epoch=1)
    whole = checkpoint.load_file(str(tmp_path / 'whole' / 'checkpoint-last.pth'))
    resumed = checkpoint.load_file(str(tmp_path / 'split' / 'checkpoint-last.pth'))
    assert resumed['epoch'] == whole['epoch'] == 1
    assert_same_weights(whole['model'], resumed['model'])
    assert_same_weights(whole['model_ema'], resumed['model_ema'])


def run_linear_probe(out, *extra):
    import main_linprobe

    argv = '--protocol linear --epochs 3 --warmup_epochs 1 --batch_size 128 --num_workers 0'.split()
    argv += ['--print_freq', '1000', '--output_dir', str(out), *extra]
    return main_linprobe.main(main_linprobe.get_args_parser().parse_args(argv))


def test_linear_probe_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """The linear probe (a 90-epoch run at full scale) stopped after epoch 1 and resumed from its
    checkpoint-last.pth:
    the same head, optimizer state and accuracy as the run that never stopped."""
    import engine_probe

    whole_metrics = run_linear_probe(tmp_path / 'whole')
    split_metrics = die_then_resume(
        monkeypatch, engine_probe, run_linear_probe, tmp_path / 'split', epoch=2
    )
    whole = checkpoint.load_file(str(tmp_path / 'whole' / 'checkpoint-last.pth'))
    resumed = checkpoint.load_file(str(tmp_path / 'split' / 'checkpoint-last.pth'))
    assert resumed['epoch'] == whole['epoch'] == 2
    assert set(whole['model']) == {
        '0.running_mean',
        '0.running_var',
        '0.num_batches_tracked',
        '1.weight',
        '1.bias',
    }  # the head only, not the frozen backbone
    assert_same_weights(whole['model'], resumed['model'])
    assert_same_weights(whole['optimizer']['state'][0], resumed['optimizer']['state'][0])
    assert split_metrics == whole_metrics and whole_metrics['acc1'] > 20  # chance is 10 %
    # Finished: a third start trains nothing and reports the same head.
    assert run_linear_probe(tmp_path / 'split')['acc1'] == whole_metrics['acc1']


def test_linear_probe_refuses_to_resume_another_run(tmp_path, teacher_path):
    """An output_dir holding a pre-training checkpoint, or the probe of another backbone:
    named, not loaded."""
    pretrained = os.path.join(teacher_path, 'checkpoint-last.pth')
    with pytest.raises(InputError, match='not by a linear probe'):
        run_linear_probe(teacher_path, '--checkpoint', pretrained)
    run_linear_probe(tmp_path, '--epochs', '1', '--warmup_epochs', '0')  # a probe of random init
    with pytest.raises(InputError, match='a linear probe of another backbone'):
        run_linear_probe(tmp_path, '--checkpoint', pretrained)


def test_rng_streams_resume_per_rank(capsys):
    """A rank resumes its own saved stream;
    under another number of processes, a fresh seeded one."""
    torch.manual_seed(1)
    saved = checkpoint.all_gather_objects(checkpoint.rng_state())  # one process: [its state]
    expected = torch.rand(3)
    checkpoint.restore_rng(saved, seed=0, start_epoch=3)
    assert torch.equal(torch.rand(3), expected)
    checkpoint.restore_rng(saved * 2, seed=0, start_epoch=3)  # saved by 2 ranks
    assert 'RNG streams of 2 process(es), this run has 1' in capsys.readouterr().out
    reseeded = torch.rand(3)
    torch.manual_seed(3000)  # --seed 0 + rank 0 + 1000 x epoch 3
    assert torch.equal(reseeded, torch.rand(3))


def test_finetune_and_pretrain_refuse_to_resume_another_run(tmp_path, teacher_path):
    """An output_dir holding the checkpoint of another --finetune / --method / --teacher:
    named, not resumed (the new run would silently carry on the old one);
    an explicit --resume still continues it."""
    import main_finetune

    pretrained = os.path.join(teacher_path, 'checkpoint-last.pth')
    out = tmp_path / 'ft'

    def finetune(*extra):
        argv = [
            '--epochs',
            '1',
            '--warmup_epochs',
            '0',
            '--num_workers',
            '0',
            '--print_freq',
            '1000',
            '--output_dir',
            str(out),
            *extra,
        ]
        return main_finetune.main(main_finetune.get_args_parser().parse_args(argv))

    finetune()  # from random init
    with pytest.raises(InputError, match=r'checkpoint of another run \(--finetune none there'):
        finetune('--finetune', pretrained)
    assert (
        finetune('--resume', str(out / 'checkpoint-last.pth'), '--finetune', pretrained)['acc1']
        is None
    )
    moco_dir = tmp_path / 'moco'
    moco_dir.mkdir()
    shutil.copy(pretrained, moco_dir / 'checkpoint-last.pth')
    with pytest.raises(InputError, match='--method mocov3 there, mae here'):
        main_pretrain.main(
            parse(
                '--method mae --epochs 1 --num_workers 0'.split() + ['--output_dir', str(moco_dir)]
            )
        )
    saved = {'args': {'teacher': 'teachers/a.pth', 'method': 'mimco'}}
    with pytest.raises(InputError, match='--teacher teachers/a.pth there, b.pth here'):
        checkpoint.check_same_run('x.pth', saved, argparse.Namespace(teacher='b.pth'), ('teacher',))
    same = argparse.Namespace(teacher='./teachers/../teachers/a.pth', method='mimco')
    checkpoint.check_same_run(
        'x.pth', saved, same, ('method', 'teacher')
    )  # one file, two spellings


@pytest.mark.slow
def test_sigkill_leaves_a_checkpoint_that_resumes(tmp_path):
    out = str(tmp_path / 'killed')
    argv = (
        [sys.executable, os.path.join(ROOT, 'main_pretrain.py')]
        + MOCO
        + SMALL
        + ['--epochs', '50', '--batch_size', '256', '--output_dir', out]
    )
    last = os.path.join(out, 'checkpoint-last.pth')
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not os.path.isfile(last) and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.isfile(last), 'no checkpoint within 5 minutes'
        # Kill as the next epochs' checkpoints are being written: poll the folder and kill at once
        # when a temporary file appears (or after a while, mid-epoch).
        deadline = time.time() + 20
        while time.time() < deadline and not any('.tmp.' in f for f in os.listdir(out)):
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    state = checkpoint.load_file(last)  # whole, whatever the moment of the kill
    result = run_script(
        MOCO
        + SMALL
        + ['--epochs', str(state['epoch'] + 2), '--batch_size', '256', '--output_dir', out]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'continuing at epoch {state["epoch"] + 1}' in result.stdout
    assert checkpoint.load_file(last)['epoch'] == state['epoch'] + 1


@pytest.mark.slow  # 33 s on 2 cores
def test_non_finite_loss_stops_with_step_terms_and_lr(tmp_path, teacher_path):
    out = str(tmp_path / 'nan')
    argv = MIMCO + [
        '--teacher',
        os.path.join(teacher_path, 'checkpoint-last.pth'),
        '--output_dir',
        out,
        '--batch_size',
        '256',
        '--warmup_epochs',
        '0',
    ]
    assert run_script(argv + ['--epochs', '1']).returncode == 0
    good = checkpoint.load_file(os.path.join(out, 'checkpoint-last.pth'))
    # Another lr: an implicit resume would refuse it (another run's settings);
    # --resume continues it.
    result = run_script(
        argv
        + ['--epochs', '2', '--lr', '1e12', '--resume', os.path.join(out, 'checkpoint-last.pth')]
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert 'non-finite loss' in message and 'epoch 1, step' in message
    assert (
        'patch_loss' in message
        and 'img_loss' in message
        and re.search(r'lr \d\.\d+e\+\d+', message)
    )
    after = checkpoint.load_file(os.path.join(out, 'checkpoint-last.pth'))
    assert after['epoch'] == 0
    assert_same_weights(good['model'], after['model'])


class LossAt(torch.nn.Module):
    """A pre-training model whose loss at step i is `losses[i]`
    (the step index rides in the input)."""

    def __init__(self, losses):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.losses = torch.tensor(losses)

    def forward(self, step):
        return self.weight * self.losses[step[0]], {}


def loop_args(accum_iter, epochs):
    """The flags a pre-training loop reads, for one fp32 process with batches of one."""
    return argparse.Namespace(
        accum_iter=accum_iter,
        print_freq=5,
        batch_size=1,
        amp='none',
        distributed=False,
        clip_grad=None,
        epochs=epochs,
        warmup_epochs=0,
        min_lr=0.0,
    )


@pytest.mark.parametrize('bad_step', [0, 4, 5, 9, 10, 11])
def test_every_step_is_checked_for_a_non_finite_loss(bad_step):
    """With --print_freq 5, a NaN at any step (the printed ones included) stops the epoch, and the
    message names that step."""
    from util.lr_sched import cosine_lr_scheduler

    losses = [1.0] * 12
    losses[bad_step] = math.nan
    model = LossAt(losses)
    loader = [((torch.tensor([i]),), 0) for i in range(12)]
    args = loop_args(accum_iter=1, epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        FloatingPointError, match=f'non-finite loss nan at epoch 0, step {bad_step} '
    ):
        scheduler = cosine_lr_scheduler(optimizer, args.epochs, args.warmup_epochs, args.min_lr, 12)
        train_epoch_on_cpu(model, loader, optimizer, scheduler, 0, print_freq=args.print_freq)


def test_accumulation_steps_every_lr_of_the_schedule_once():
    """11 batches an epoch, --accum_iter 2: 6 steps an epoch (the last one on a single batch), each
    at the next lr of one cosine over all 5 epochs, each on the mean gradient of its batches."""
    from util.lr_sched import cosine_lr_scheduler, updates_per_epoch

    model = LossAt([1.0] * 11)  # each batch's gradient of `weight` is 1
    loader = [((torch.tensor([i]),), 0) for i in range(11)]
    args = loop_args(accum_iter=2, epochs=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []  # (lr, gradient) at each optimizer step
    optimizer.register_step_pre_hook(
        lambda opt, *_: steps.append((opt.param_groups[0]['lr'], model.weight.grad.item()))
    )
    updates = updates_per_epoch(len(loader), args.accum_iter)
    scheduler = cosine_lr_scheduler(
        optimizer, args.epochs, args.warmup_epochs, args.min_lr, updates
    )
    for epoch in range(args.epochs):
        train_epoch_on_cpu(
            model,
            loader,
            optimizer,
            scheduler,
            epoch,
            accum_iter=args.accum_iter,
            print_freq=args.print_freq,
        )
    lrs, grads = zip(*steps)
    assert len(steps) == 5 * 6 and grads == (1.0,) * 30
    expected = [0.05 * (1 + math.cos(math.pi * i / 30)) for i in range(30)]
    assert lrs == pytest.approx(expected) and lrs[-1] > 0


def make_image_folder(root, classes=2, images=2, corrupt=False):
    from PIL import Image

    for c in range(classes):
        folder = root / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(images):
            Image.new('RGB', (20, 20), (40 * c, 10 * i, 0)).save(folder / f'{i}.png')
    if corrupt:
        (root / 'train' / 'class0' / 'broken.png').write_bytes(b'no image in here')


def bad_inputs(tmp_path):
    """(name, argv, a piece of the expected message) for each bad input."""
    resnet = tmp_path / 'resnet.pth'
    import timm

    torch.save(timm.create_model('resnet10t').state_dict(), resnet)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'\x80\x02garbage')
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    (tmp_path / 'no_images' / 'train' / 'class0').mkdir(parents=True)
    make_image_folder(tmp_path / 'corrupt_images', corrupt=True)
    gray_teacher = tmp_path / 'gray_teacher.pth'
    from timm.models.vision_transformer import VisionTransformer

    torch.save(
        VisionTransformer(
            img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=1, num_heads=1, num_classes=0
        ).state_dict(),
        gray_teacher,
    )
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    out = ['--output_dir', str(tmp_path / 'out')]
    return [
        (
            'missing data folder',
            MOCO + ['--data_path', str(tmp_path / 'nowhere')] + out,
            'does not exist',
        ),
        (
            'empty data folder',
            MOCO + ['--data_path', str(tmp_path / 'empty')] + out,
            'no images in',
        ),
        (
            'folder without images',
            MOCO + ['--data_path', str(tmp_path / 'no_images')] + out,
            'no images in',
        ),
        (
            'corrupt image',
            MOCO
            + [
                '--data_path',
                str(tmp_path / 'corrupt_images'),
                '--batch_size',
                '5',
                '--input_size',
                '16',
            ]
            + out,
            'broken.png is not a readable image',
        ),
        (
            'corrupt checkpoint',
            MIMCO + ['--teacher', str(corrupt)] + out,
            'not a readable PyTorch checkpoint',
        ),
        (
            'a ResNet as teacher',
            MIMCO + ['--teacher', str(resnet)] + out,
            'holds no Vision Transformer',
        ),
        ('a ResNet to resume', MOCO + ['--resume', str(resnet)] + out, 'not a training checkpoint'),
        (
            'mask ratio outside (0, 1)',
            MIMCO + ['--teacher', str(resnet), '--mask_ratio', '1.5'] + out,
            'must lie in (0, 1)',
        ),
        (
            'batch larger than the data',
            MOCO + ['--batch_size', '5000'] + out,
            'larger than the 1437 training images',
        ),
        (
            'output dir not writable',
            MOCO + ['--output_dir', str(a_file / 'out')],
            'is not writable',
        ),
        (
            'input size not a multiple of the patch',
            MOCO + ['--input_size', '18'] + out,
            'not a multiple of the patch size',
        ),
        (
            'a teacher that cannot fit the student',
            MIMCO + ['--teacher', str(gray_teacher)] + out,
            'cannot give targets for this student',
        ),
    ]


@pytest.mark.parametrize('case', range(12))
def test_bad_input_is_named_with_its_fix(case, tmp_path):
    name, argv, expected = bad_inputs(tmp_path)[case]
    with pytest.raises(InputError) as error:
        main_pretrain.main(parse(argv))
    assert expected in one_line(error.value), (name, one_line(error.value))


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_script(MOCO + ['--batch_size', '5000', '--output_dir', str(tmp_path)])
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: --batch_size 5000')


@pytest.mark.slow
def test_mae_two_processes_equal_one_process(tmp_path):
    """Same global batch (2 x 64 vs 1 x 128): the same loss curve. Augmentations and masks are
    seeded per sample, the masked-patch counts are equal, and DDP averages the gradients."""
    argv = TINY_MAE + '--epochs 2 --warmup_epochs 1 --blr 1e-3 --num_workers 0'.split()
    single = run_script(argv + ['--batch_size', '128', '--output_dir', str(tmp_path / 'one')])
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = (
        TORCHRUN
        + ['main_pretrain.py']
        + argv
        + ['--batch_size', '64', '--output_dir', str(tmp_path / 'two')]
    )
    env = dict(os.environ, OMP_NUM_THREADS='1')
    double = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = epoch_losses(tmp_path / 'one'), epoch_losses(tmp_path / 'two')
    assert len(one) == len(two) == 2 and one[1] < one[0]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    'script,argv',
    [
        ('main_linprobe.py', ['--checkpoint', 'random', '--protocol', 'knn']),
        ('main_finetune.py', ['--epochs', '1', '--warmup_epochs', '0', '--batch_size', '64']),
    ],
)
def test_evaluation_scripts_under_torchrun(script, argv, tmp_path):
    cmd = TORCHRUN + [script, '--num_workers', '0', '--output_dir', str(tmp_path)] + argv
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'rank 1 of 2' in result.stdout + result.stderr
    summary = [json.loads(line) for line in open(tmp_path / 'log.txt')][-1]
    if script == 'main_linprobe.py':
        # Features of the whole val set from both ranks: the kNN of one process, to the image. (Each
        # rank seeds differently; a random-init backbone built from those seeds would not match.)
        import main_linprobe

        alone = main_linprobe.main(
            main_linprobe.get_args_parser().parse_args(
                argv + ['--num_workers', '0', '--output_dir', str(tmp_path / 'alone')]
            )
        )
        assert summary['acc1'] == pytest.approx(alone['acc1'], abs=1e-4), (
            summary['acc1'],
            alone['acc1'],
        )
