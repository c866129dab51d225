"""The official linear-probe recipes (engine_probe.py, util/probe.py): Layer Grafted's sweep against
each head trained alone, the per-epoch cosine against MoCo v3's formula, the head choice, and real
runs of main_linprobe.py on digits."""

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn

import engine_probe
import main_linprobe
from engine import LoopSettings
from engine_finetune import extract_features, train_one_epoch
from util import data, probe, transforms
from util.errors import InputError
from util.features import frozen_backbone

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def probe_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()])
    fast = ['--num_workers', '0', '--print_freq', '1000']
    return parser.parse_args(fast + [str(a) for a in argv])


def tiny_features(n: int = 96, dim: int = 8, classes: int = 4) -> tuple:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def test_sweep_equals_each_head_trained_alone():
    """70 heads in one pass (one einsum, one loss) end where 70 nn.Linear heads trained one by one
    with torch.optim.SGD (momentum 0, their own lr and weight decay, lr set per epoch by MoCo v3's
    adjust_learning_rate formula) end."""
    x, y = tiny_features()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    epochs = 3
    total_batch = 32
    torch.manual_seed(0)
    heads = probe.SweepHeads(70, 8, 4)
    start_weight = heads.weight.detach().clone()
    optimizer = engine_probe.probe_optimizer(
        heads, argparse.Namespace(protocol='lincls_grafted'), total_batch
    )
    scheduler = probe.EpochCosine(optimizer, epochs, updates=len(batches))
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    loop = LoopSettings(torch.device('cpu'), optimizer, scheduler, scaler, print_freq=1000)
    for epoch in range(epochs):
        train_one_epoch(heads, probe.sweep_loss, batches, loop, epoch)
    lrs, wds = probe.sweep_grid(total_batch)
    assert len(lrs) == 70 and lrs[0] == 1e-5 * 32 / 256 and lrs[-1] == 90 * 32 / 256
    assert torch.equal(wds[:2], torch.tensor([0.0, 1e-6], dtype=torch.float64))
    for h in range(70):
        linear = nn.Linear(8, 4)
        linear.weight.data.copy_(start_weight[h])
        nn.init.zeros_(linear.bias)
        sgd = torch.optim.SGD(linear.parameters(), lr=lrs[h].item(), weight_decay=wds[h].item())
        for epoch in range(epochs):
            for group in sgd.param_groups:
                group['lr'] = lrs[h].item() * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            for inputs, targets in batches:
                sgd.zero_grad()
                nn.functional.cross_entropy(linear(inputs), targets).backward()
                sgd.step()
        scale = linear.weight.abs().max().item()
        torch.testing.assert_close(heads.weight[h], linear.weight, rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(heads.bias[h], linear.bias, rtol=1e-4, atol=1e-6 * scale)


def test_cosine_is_per_epoch_without_warmup():
    """MoCo v3's adjust_learning_rate: lr x 0.5 (1 + cos(pi e / E)) for every step of epoch e."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=12.0, momentum=0.9)
    scheduler = probe.EpochCosine(optimizer, epochs=4, updates=3)
    seen = []
    for update in range(12):
        scheduler.step_update(update)
        seen.append(optimizer.param_groups[0]['lr'])
    expected = [12 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert seen[::3] == pytest.approx(expected)
    assert seen[3:6] == [seen[3]] * 3  # constant within an epoch
    assert seen[3] == pytest.approx(10.2426, abs=1e-4)


def test_best_head_and_holdout_split():
    """Ties go to the later head (`>=` in main_lincls_sweep.py); the held-out part is disjoint from
    the training part, seeded, and eval-transformed."""
    assert probe.best_head(torch.tensor([10.0, 30.0, 20.0, 30.0])) == 3
    assert probe.best_head(torch.tensor([50.0, 30.0])) == 0
    data = torch.utils.data.TensorDataset(torch.arange(50))
    data.transform = 'train'
    kept, held = probe.holdout_split(data, 'eval', 0.2, seed=3)
    assert len(held) == 10 and len(kept) == 40
    assert not set(kept.indices) & set(held.indices)
    assert held.dataset.transform == 'eval' and kept.dataset.transform == 'train'
    assert probe.holdout_split(data, 'eval', 0.2, seed=3)[1].indices == held.indices
    with pytest.raises(InputError, match='--sweep_holdout'):
        probe.holdout_split(data, 'eval', 1.0, seed=3)


def per_head_accuracy(weight, bias, features, labels) -> torch.Tensor:
    """Each head's top-1 (%), one head at a time."""
    return torch.stack(
        [
            ((features @ w.T + b).argmax(1) == labels).float().mean() * 100
            for w, b in zip(weight, bias)
        ]
    )


@pytest.mark.parametrize('select_on_val', [False, True])
def test_sweep_run_chooses_the_best_head(tmp_path, select_on_val):
    """main_linprobe.py --protocol lincls_grafted on digits: the reported head is the best on the
    held-out part of train (or on val with --select_on_val), its accuracy its val accuracy."""
    args = probe_args('--protocol', 'lincls_grafted', '--epochs', 10, '--output_dir', tmp_path)
    args.select_on_val = select_on_val
    metrics = main_linprobe.main(args)
    saved = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    weight, bias = saved['model']['weight'], saved['model']['bias']
    assert weight.shape[0] == 70 and set(saved['model']) == {'weight', 'bias'}  # no BatchNorm
    backbone = frozen_backbone('random', args.model, None, False, args.seed)
    view = transforms.eval_transform(args)  # lincls_grafted: bilinear, as the lincls files resize
    val_set = data.build_dataset(args, False, view)
    train_set = data.build_dataset(args, True, view)
    val_x, val_y = extract_features(backbone, val_set, torch.device('cpu'), args)
    val_acc = per_head_accuracy(weight, bias, val_x, val_y)
    if select_on_val:
        chosen_on = val_acc
    else:
        held = probe.holdout_split(train_set, val_set.transform, 0.1, args.seed)[1]
        held_x, held_y = extract_features(backbone, held, torch.device('cpu'), args)
        chosen_on = per_head_accuracy(weight, bias, held_x, held_y)
    head = probe.best_head(chosen_on)
    assert metrics['head'] == head and chosen_on[head] == chosen_on.max()
    assert metrics['acc1'] == pytest.approx(val_acc[head].item(), abs=1e-3)
    assert metrics['acc1'] > 25  # the chosen head learned (10 classes: 10 % by chance)
    log = [json.loads(line) for line in open(tmp_path / 'log.txt')]
    assert log[-1]['summary'] == 'lincls_grafted' and log[-1]['head'] == head


def test_mocov3_lincls_run_has_no_batchnorm_and_official_schedule(tmp_path):
    """--protocol lincls_mocov3: a bare Linear (no BN), SGD momentum 0.9 and weight decay 0, the
    lr constant within an epoch and cosine across them from blr x batch / 256, no warm-up."""
    args = probe_args(
        '--protocol', 'lincls_mocov3', '--epochs', 3, '--blr', 0.1, '--output_dir', tmp_path
    )
    metrics = main_linprobe.main(args)
    saved = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert set(saved['model']) == {'weight', 'bias'}
    group = saved['optimizer']['param_groups'][0]
    assert group['momentum'] == 0.9 and group['weight_decay'] == 0.0
    lr = 0.1 * 256 / 256
    epochs = [json.loads(line) for line in open(tmp_path / 'log.txt')][1:-1]
    logged = [epoch['train_lr'] for epoch in epochs]
    assert logged == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])
    assert metrics['acc1'] > 20


def test_old_sgd_flag_names_the_new_protocol():
    args = probe_args('--optimizer', 'sgd')
    with pytest.raises(InputError, match='--protocol lincls_mocov3'):
        main_linprobe.resolve_args(args, digits=True)
    with pytest.raises(InputError, match='no warm-up'):
        main_linprobe.resolve_args(
            probe_args('--protocol', 'lincls_mocov3', '--warmup_epochs', 5), True
        )
    with pytest.raises(InputError, match='grid'):
        main_linprobe.resolve_args(probe_args('--protocol', 'lincls_grafted', '--blr', 1), True)


def test_sweep_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """The 70 heads stopped after epoch 1 and resumed from checkpoint-last.pth: the same heads, the
    same chosen head and accuracy as the run that never stopped."""
    from tests.test_reliability import die_then_resume

    def run_sweep(out):
        args = probe_args('--protocol', 'lincls_grafted', '--epochs', 3, '--output_dir', out)
        return main_linprobe.main(args)

    whole = run_sweep(tmp_path / 'whole')
    split = die_then_resume(monkeypatch, engine_probe, run_sweep, tmp_path / 'split', epoch=2)
    assert split == whole
    saved = [
        torch.load(tmp_path / run / 'checkpoint-last.pth', weights_only=True)
        for run in ('whole', 'split')
    ]
    assert torch.equal(saved[0]['model']['weight'], saved[1]['model']['weight'])
