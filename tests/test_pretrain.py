"""MoCo v3 and MimCo pre-training on digits, end to end: the real scripts, small settings."""

import copy
import json
import os
import subprocess

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import losses
import models_mimco
import models_mocov3
import pretrain_setup as pretrain
from tests.conftest import (
    MIMCO,
    MOCO,
    ROOT,
    TORCHRUN,
    epoch_losses,
    knn_of,
    parse,
    run_script,
    train_epoch_on_cpu,
)
from util import checkpoint, data, transforms


def test_mocov3_loss_falls(teacher_path):
    losses = epoch_losses(teacher_path)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses


def test_momentum_update_follows_m():
    torch.manual_seed(0)
    args = parse(MOCO + ['--drop_path', '0'])
    pretrain.resolve_args(args)
    encoder = pretrain.create_vit(args)
    moco = models_mocov3.MoCoV3(encoder, dim=16, mlp_dim=32)
    with torch.no_grad():
        for p in moco.base_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.momentum_encoder.parameters()]
    moco.update_momentum_encoder(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, moco.momentum_encoder.parameters()))
    moco.update_momentum_encoder(0.5)
    for k0, q, k in zip(before, moco.base_encoder.parameters(), moco.momentum_encoder.parameters()):
        torch.testing.assert_close(k, 0.5 * k0 + 0.5 * q)
    moco.update_momentum_encoder(0.0)
    assert all(
        torch.equal(q, k)
        for q, k in zip(moco.base_encoder.parameters(), moco.momentum_encoder.parameters())
    )
    # The schedule: base_m at the start, 1 at the end (MoCo v3's half cosine).
    from models_mocov3 import moco_momentum

    assert moco_momentum(0, 0.99, 100) == pytest.approx(0.99)
    assert moco_momentum(100, 0.99, 100) == pytest.approx(1.0)
    assert moco_momentum(50, 0.99, 100) == pytest.approx(0.995)


def test_mocov3_one_pass_over_both_views_equals_separate_passes():
    """MoCoV3 runs its ViTs once on the two views stacked: the loss, every gradient and the heads'
    BatchNorm statistics must equal those of the official per-view passes (which a BatchNorm over
    both views at once would not give)."""
    torch.manual_seed(0)
    encoder = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    # float64: only the order of the sums differs,
    # so the two must agree far below float32's rounding.
    moco = models_mocov3.MoCoV3(encoder, dim=16, mlp_dim=32).double().train()
    official = copy.deepcopy(moco)
    views = torch.randn(2, 8, 3, 16, 16, dtype=torch.float64)
    view1, view2 = (
        views[0],
        views[1] + 1.0,
    )  # views with different statistics, for the heads' BatchNorm
    loss, _ = moco(view1, view2, 0.9)

    q1 = official.predictor(official.base_encoder(view1))
    q2 = official.predictor(official.base_encoder(view2))
    with torch.no_grad():
        official.update_momentum_encoder(0.9)
        k1, k2 = official.momentum_encoder(view1), official.momentum_encoder(view2)
    official_loss = losses.moco_infonce(q1, k2, official.temperature) + losses.moco_infonce(
        q2, k1, official.temperature
    )
    torch.testing.assert_close(loss, official_loss)
    loss.backward()
    official_loss.backward()
    for (name, p), q in zip(moco.named_parameters(), official.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(moco.named_buffers(), official.buffers()):
        torch.testing.assert_close(b, c, msg=name)  # BN running statistics, updated once per view
    assert sum('running_mean' in name for name, _ in moco.named_buffers()) >= 4


def test_teacher_frozen_and_gets_no_gradient(teacher_path):
    args = parse(
        MIMCO
        + '--epochs 1 --warmup_epochs 0'.split()
        + ['--teacher', os.path.join(teacher_path, 'checkpoint-last.pth'), '--output_dir', '']
    )
    pretrain.resolve_args(args)
    args.distributed, args.lr = False, 1e-3
    model, teacher = pretrain.build_model(args)
    assert teacher.projector is not None  # --teacher_target auto: the MoCo v3 projector
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = model.student.blocks[0].attn.qkv.weight.clone()
    dataset = data.build_dataset(
        args, True, transforms.pretrain_transform(args, model.mask_generator)
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(256)), batch_size=64
    )
    optimizer = pretrain.build_optimizer(args, model)
    from timm.scheduler import CosineLRScheduler

    scheduler = CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False)
    teacher.train()  # a stray train() must not put the teacher's BatchNorm in training mode
    train_epoch_on_cpu(model, loader, optimizer, scheduler, 0, amp=args.amp, teacher=teacher)
    assert not teacher.training and not teacher.projector.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(model.student.blocks[0].attn.qkv.weight, student_before)


def test_mimco_heads():
    """--head_norm bn: Linear (no bias), BatchNorm over every token of the batch, ReLU, Linear (no
    bias); none: Linear, GELU, Linear. Both map tokens of any leading shape."""
    torch.manual_seed(0)
    head = models_mimco.build_head(2, 8, 16, 4, 'bn')
    assert [type(m) for m in head] == [
        torch.nn.Linear,
        torch.nn.BatchNorm1d,
        torch.nn.ReLU,
        torch.nn.Linear,
    ]
    assert head[0].bias is None and head[3].bias is None and head[1].affine
    tokens = torch.randn(3, 5, 8)  # (B, K, D)
    hidden = tokens.reshape(15, 8) @ head[0].weight.t()  # BN statistics over all B * K tokens
    hidden = (hidden - hidden.mean(0)) / (hidden.var(0, unbiased=False) + 1e-5).sqrt()
    expected = (hidden.relu() @ head[3].weight.t()).reshape(3, 5, 4)
    torch.testing.assert_close(head.train()(tokens), expected)
    torch.testing.assert_close(head(tokens[:, 0]), head(tokens[:, :1])[:, 0])  # (B, D) tokens too
    gelu = models_mimco.build_head(2, 8, 16, 4, 'none')
    assert [type(m) for m in gelu] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert gelu(tokens).shape == (3, 5, 4)


@pytest.mark.parametrize('img_loss', ['infonce', 'none'])
def test_every_trainable_mimco_parameter_gets_a_gradient(teacher_path, img_loss):
    """DDP without static_graph (as with --accum_iter > 1)
    fails on a parameter that no loss reaches."""
    args = parse(
        MIMCO
        + [
            '--teacher',
            os.path.join(teacher_path, 'checkpoint-last.pth'),
            '--img_loss',
            img_loss,
            '--output_dir',
            '',
        ]
    )
    pretrain.resolve_args(args)
    args.distributed = False
    model, teacher = pretrain.build_model(args)
    dataset = data.build_dataset(
        args, True, transforms.pretrain_transform(args, model.mask_generator)
    )
    inputs, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=16)))
    loss, terms = model(*inputs, targets=teacher(inputs[0]))
    loss.backward()
    assert ('img_loss' in terms) == (img_loss != 'none')
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_mimco_script_trains_logs_and_resumes(teacher_path, tmp_path):
    teacher = os.path.join(teacher_path, 'checkpoint-last.pth')
    out = str(tmp_path / 'mimco')
    argv = MIMCO + [
        '--teacher',
        teacher,
        '--warmup_epochs',
        '1',
        '--blr',
        '1e-3',
        '--output_dir',
        out,
    ]
    result = run_script(argv + ['--epochs', '3'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'its projector on the CLS token' in result.stdout
    losses = epoch_losses(out)
    assert losses[-1] < losses[0] - 0.5, losses
    assert os.path.isfile(os.path.join(out, 'checkpoint-last.pth'))
    logged = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))][
        1
    ]  # after the run header
    assert {'train_patch_loss', 'train_img_loss', 'train_lr', 'epoch'} <= set(logged)
    result = run_script(argv + ['--epochs', '4'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'resumed from' in result.stdout and 'epochs 3..3' in result.stdout
    assert len(epoch_losses(out)) == 4


def test_mimco_student_learns_from_its_teacher(teacher_path, tmp_path):
    """A short MimCo run from the suite's MoCo v3 teacher (kNN 67.5): the student's kNN top-1 after
    5 epochs was 58.3 / 59.2 / 63.1 (seeds 0 / 1 / 2) with the BatchNorm heads and the
    border-extended digits view, and 44.7 / 49.7 / 45.0 before them (GELU heads, RandomAffine with a
    black margin); random init gives 36.7."""
    import main_pretrain

    out = str(tmp_path / 'mimco')
    main_pretrain.main(
        parse(
            MIMCO
            + '--epochs 5 --warmup_epochs 1 --blr 2e-3 --drop_path 0'.split()
            + ['--teacher', os.path.join(teacher_path, 'checkpoint-last.pth'), '--output_dir', out]
        )
    )
    knn = knn_of(os.path.join(out, 'checkpoint-last.pth'), tmp_path / 'knn')
    assert knn['acc1'] > 54.0, knn


def test_mimco_without_teacher_explains(tmp_path):
    result = run_script(['--method', 'mimco', '--output_dir', str(tmp_path)])
    assert result.returncode == 2
    assert 'needs --teacher' in result.stderr and 'Traceback' not in result.stderr


def test_torchrun_two_processes_on_cpu(teacher_path, tmp_path):
    teacher = os.path.join(teacher_path, 'checkpoint-last.pth')
    out = str(tmp_path / 'ddp')
    cmd = (
        TORCHRUN
        + ['main_pretrain.py']
        + MIMCO
        + ['--teacher', teacher, '--epochs', '1', '--batch_size', '64', '--output_dir', out]
    )
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'rank 1 of 2' in result.stdout + result.stderr
    assert len(epoch_losses(out)) == 1
    with open(os.path.join(out, 'log.txt')) as f:
        header, epoch = [json.loads(line) for line in f][:2]
    assert header['world_size'] == 2 and header['total_batch'] == 128
    # The kNN monitor on 2 ranks (each val image once):
    # what one process gives for the saved backbone.
    knn = knn_of(os.path.join(out, 'checkpoint-last.pth'), tmp_path / 'knn')
    assert abs(epoch['knn_acc1'] - knn['acc1']) < 0.3, (epoch, knn)  # one val image is 0.28 points
    # Each rank's RNG stream is saved (and resumed) as its own: their drop path and masks differ.
    rng = checkpoint.load_file(os.path.join(out, 'checkpoint-last.pth'))['rng']
    assert len(rng) == 2 and not torch.equal(rng[0]['torch'], rng[1]['torch'])
