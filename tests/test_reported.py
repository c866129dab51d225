"""Failures that users reported against MAE, DINO, DeiT, MoCo v3 and timm, rebuilt as small inputs
(issue 16): loader RNG and resume, evaluation shards, kNN top-5, runs that continue another run, val
classes, 16-bit images, accumulation with contrastive losses, process groups, the NaN message."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import main_finetune
import main_linprobe
import main_pretrain
import pretrain_setup as pretrain
from engine import check_finite
from tests.conftest import ROOT, parse
from tests.test_eval import run
from util import checkpoint, data, features
from util.errors import InputError, run_main

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def image_folder(root, train=('a', 'b', 'c'), val=('a', 'b', 'c'), per_class=(6, 2)):
    """train/ and val/ of small distinct images, one folder per class name."""
    k = 0
    for split, classes, count in (('train', train, per_class[0]), ('val', val, per_class[1])):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(count):
                k += 1
                color = (ord(name) * 37 % 256, 40 * i % 256, 13 * k % 256)
                Image.new('RGB', (20, 20), color).save(root / split / name / f'{name}{i}.png')
    return str(root)


# ------------------------------------------------------------ 1. loaders and resume


@pytest.mark.parametrize('is_train,workers', [(True, 0), (True, 2), (False, 2)])
def test_loaders_leave_the_global_rng_alone(is_train, workers):
    """Starting a loader's iterator drew its workers' base seed from the global torch stream, once
    per run with persistent workers: a resumed run drew it at another point, and every drop path
    after it differed (87 tensors of a MimCo run with --num_workers 2)."""
    args = argparse.Namespace(batch_size=4, seed=0, num_workers=workers)
    dataset = torch.utils.data.TensorDataset(torch.arange(16.0))
    loader = data.build_loader(dataset, args, is_train=is_train, random_samples=False)
    expected = torch.manual_seed(5) and torch.rand(3)
    torch.manual_seed(5)
    for _ in range(2):  # two epochs: persistent workers start once
        list(loader)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------ 2. evaluation shards


@pytest.mark.parametrize('world_size', [2, 3, 4, 8])
def test_evaluation_shards_hold_each_image_once(world_size, monkeypatch):
    """7 val images on 2 / 3 processes were padded to 8 / 9 and the repeats scored."""
    args = argparse.Namespace(batch_size=2, seed=0, num_workers=0)
    seen = []
    for rank in range(world_size):
        monkeypatch.setattr(data, 'get_rank', lambda rank=rank: rank)
        monkeypatch.setattr(data, 'get_world_size', lambda: world_size)
        seen += list(data.build_loader(list(range(7)), args, is_train=False).sampler)
    assert sorted(seen) == list(range(7))


def torchrun(nproc, script, argv, out):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node']
    cmd += [str(nproc), script, '--num_workers', '0', '--output_dir', str(out)]
    cmd += [str(a) for a in argv]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
    )
    assert result.returncode == 0, result.stderr[-3000:]  # 8: a finished run exits 0
    return [json.loads(line) for line in open(out / 'log.txt')]


@pytest.mark.slow
def test_distributed_evaluation_equals_one_process(tmp_path):
    """Fine-tune --eval, kNN, and a fine-tuning epoch's val (which picks checkpoint-best.pth) on 7
    val images: on 2 and 3 processes, the numbers of one process; every torchrun exits 0."""
    root = image_folder(tmp_path / 'data', per_class=(6, 3))
    for extra in ('b/b2.png', 'c/c2.png'):
        os.remove(os.path.join(root, 'val', extra))  # 7 val images
    common = ['--data_path', root, '--input_size', 16, '--batch_size', 4]
    runs = {
        'ft': (main_finetune, ['--eval'] + common),
        'knn': (main_linprobe, ['--protocol', 'knn', '--checkpoint', 'random'] + common),
    }
    for name, (script, argv) in runs.items():
        alone = run(script, *argv, '--num_workers', 0, '--output_dir', tmp_path / f'{name}1')
        for nproc in (2, 3):
            summary = torchrun(nproc, f'{script.__name__}.py', argv, tmp_path / f'{name}{nproc}')[
                -1
            ]
            assert summary['acc1'] == pytest.approx(alone['acc1'], abs=1e-4), (name, nproc)
    epoch = torchrun(
        2, 'main_finetune.py', common + ['--epochs', 1, '--warmup_epochs', 0], tmp_path / 'ft'
    )[1]  # [0]: the run header
    correct = epoch['test_acc1'] * 7 / 100  # of 8 with a repeat
    assert correct == pytest.approx(round(correct), abs=1e-6)


# ------------------------------------------------------------ 3. kNN top-5


def test_knn_top5_counts_only_classes_with_a_vote(tmp_path):
    """With one neighbour, one class gets a vote: top-5 is top-1 (was 63.89 against 40.28)."""
    argv = '--protocol knn --checkpoint random --knn_k 1 --num_workers 0'.split()
    metrics = run(main_linprobe, *argv, '--output_dir', tmp_path)
    assert metrics['acc5'] == metrics['acc1'] < 90
    votes = features.knn_scores(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3)[:1], 3, k=2)
    assert (
        votes[0, 2] == -float('inf') and votes[0, 0] > votes[0, 1] > 0
    )  # neighbours 0 and 1 voted
    assert features.topk_accuracy(votes, torch.tensor([2]), (1, 3)) == [0.0, 0.0]


# ------------------------------------------------------------ 4. another run's checkpoint


def test_implicit_resume_refuses_another_runs_settings(tmp_path):
    """Another --data_path or --blr in the same --output_dir was resumed as if it were the same run;
    raising --epochs still extends a finished run."""
    a, b = (
        image_folder(tmp_path / 'a'),
        image_folder(tmp_path / 'b', train=('x', 'y', 'z'), val=('x', 'y', 'z')),
    )
    out = tmp_path / 'out'
    argv = [
        '--input_size',
        16,
        '--batch_size',
        4,
        '--warmup_epochs',
        0,
        '--num_workers',
        0,
        '--print_freq',
        1000,
        '--output_dir',
        out,
    ]
    run(main_finetune, *argv, '--data_path', a, '--epochs', 1)
    with pytest.raises(
        InputError, match=re.escape(f'another run (--data_path {a} there, {b} here)')
    ):
        run(main_finetune, *argv, '--data_path', b, '--epochs', 1)
    with pytest.raises(InputError, match=r'--blr 0.0005 there, 0.001 here'):
        run(main_finetune, *argv, '--data_path', a, '--epochs', 2, '--blr', 1e-3)
    with pytest.raises(
        InputError, match=r'--lr 7.81e-06 there, 1e-05 here \(the lr is --blr x batch'
    ):
        saved = {'args': {'lr': 7.81e-06}}
        checkpoint.check_same_run('x.pth', saved, argparse.Namespace(lr=1e-5))
    run(main_finetune, *argv, '--data_path', a, '--epochs', 2)  # the same run, extended
    assert checkpoint.load_file(str(out / 'checkpoint-last.pth'))['epoch'] == 1


# ------------------------------------------------------------ 5. val classes


def test_val_uses_train_class_indices(tmp_path, capsys):
    """val/ without train's 'b' labelled its 'c' as 1 (and kNN crashed on train's label 2); val/
    with a class train/ lacks was scored against another class's label."""
    args = argparse.Namespace(
        data_path=image_folder(tmp_path / 'missing', val=('a', 'c')), dataset='auto'
    )
    val = data.build_dataset(args, False, None)
    assert val.classes == ['a', 'b', 'c'] and sorted(set(val.targets)) == [0, 2]
    assert 'lacks 1 of the 3 classes of train/' in capsys.readouterr().out
    argv = '--protocol knn --checkpoint random --input_size 16 --num_workers 0'.split()
    metrics = run(
        main_linprobe, *argv, '--data_path', args.data_path, '--output_dir', tmp_path / 'knn'
    )
    assert metrics['n_val'] == 4
    args.data_path = image_folder(tmp_path / 'extra', val=('a', 'b', 'd', 'e'))
    with pytest.raises(InputError, match=r'val has class folders that .*train has not \(d, e\)'):
        data.build_dataset(args, False, None)


# ------------------------------------------------------------ 6. 16-bit images


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    """A 0..65535 ramp (mode I;16) came out as 0 and 255: now each 8-bit level 256 times."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    assert Image.open(tmp_path / 'ramp.png').mode == 'I;16'
    pixels = np.asarray(data.load_image(str(tmp_path / 'ramp.png')))
    assert (
        np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
        and (pixels[..., 0] == pixels[..., 2]).all()
    )
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / 'ramp.tif')  # mode I
    assert np.array_equal(np.asarray(data.load_image(str(tmp_path / 'ramp.tif'))), pixels)
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / 'float.tif')
    with pytest.raises(InputError, match='float.tif has F pixels'):
        data.load_image(str(tmp_path / 'float.tif'))


# ------------------------------------------------------------ 7. accumulation


@pytest.mark.parametrize(
    'argv,warned',
    [
        (['--method', 'mocov3'], 'momentum encoder moves at every micro-batch (4 times'),
        (
            ['--method', 'mimco'],
            "MimCo's image-level InfoNCE negatives and its heads' BatchNorm see one micro-batch",
        ),
        (['--method', 'mimco', '--img_loss', 'cosine'], "its heads' BatchNorm see one micro-batch"),
        (['--method', 'mimco', '--img_loss', 'cosine', '--head_norm', 'none'], None),
        (['--method', 'mae'], None),
    ],
)
def test_accumulation_with_a_contrastive_loss_says_what_it_does(argv, warned, capsys):
    args = parse(argv + ['--batch_size', '32', '--accum_iter', '4'])
    pretrain.resolve_args(args)
    pretrain.warn_accumulated_contrast(args)
    printed = capsys.readouterr().out
    if warned:
        assert (
            warned in printed
            and 'not the total batch of 128' in printed
            and len(printed.splitlines()) == 1
        )
    else:
        assert 'accum_iter' not in printed


# ------------------------------------------------------------ 8. process groups


@pytest.mark.parametrize(
    'script,argv',
    [
        (main_linprobe, ['--protocol', 'knn', '--checkpoint', 'random', '--batch_size', '512']),
        (
            main_finetune,
            ['--epochs', '1', '--batch_size', '5000'],
        ),  # an InputError after the group starts
        (main_pretrain, ['--method', 'mae', '--batch_size', '5000']),
    ],
)
def test_process_group_is_destroyed_at_the_end(script, argv, tmp_path, monkeypatch):
    """Left to the interpreter's exit, gloo could abort a finished run ('terminate called without an
    active exception', exit 1): every script's run ends its process group, after an error too."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for name, value in dict(
        RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    ).items():
        monkeypatch.setenv(name, value)
    args = argparse.ArgumentParser(parents=[script.get_args_parser()]).parse_args(
        argv + ['--num_workers', '0', '--output_dir', str(tmp_path)]
    )
    try:
        try:
            run_main(script.main, args)
        except SystemExit as e:
            assert e.code == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------ 9. NaN message


def test_non_finite_message_without_loss_terms():
    with pytest.raises(FloatingPointError, match=r'step 3 \(lr 1.6e\+04\)\. The last'):
        check_finite([1.0, float('nan')], 2, 0, {}, 1.6e4)
    with pytest.raises(FloatingPointError, match=r'step 2 \(patch_loss nan, lr 0.1\)'):
        check_finite([float('nan')], 2, 0, {'patch_loss': float('nan')}, 0.1)
