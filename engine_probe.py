"""Linear probes on a frozen backbone (main_linprobe.py), one recipe per official file:

- linear:         MAE's main_linprobe.py: BatchNorm (no affine) + Linear, LARS, warm-up and a
                  cosine per update.
- lincls_mocov3:  MoCo v3's main_lincls.py: Linear alone (no BN), SGD momentum 0.9, no warm-up,
                  cosine per epoch.
- lincls_grafted: Layer Grafted's main_lincls_sweep.py: 70 Linear heads (35 lrs x 2 weight decays)
                  trained in one pass over the same features, plain SGD (momentum 0), cosine per
                  epoch; the best head is chosen on a held-out part of train (theirs: on val).
"""

import argparse
import math
import os

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import TensorDataset

from engine import LoopSettings
from engine_finetune import evaluate, extract_features, train_one_epoch
from util import checkpoint, data
from util.dist import get_world_size, wrap_ddp
from util.errors import InputError
from util.features import backbone_fingerprint
from util.lars import lars
from util.logging import log_json, tensorboard_writer
from util.lr_sched import cosine_lr_scheduler, total_batch_size, updates_per_epoch
from util.probe import (
    SWEEP_BASE_LRS,
    SWEEP_WEIGHT_DECAYS,
    EpochCosine,
    SweepHeads,
    SweepSGD,
    best_head,
    head_accuracies,
    holdout_split,
    sweep_grid,
    sweep_loss,
)

LINEAR_PROTOCOLS = ('linear', 'lincls_mocov3', 'lincls_grafted')


class FrozenProbe(nn.Module):
    """Frozen backbone (always in eval(), no grad) + trainable head, for images augmented anew
    each epoch: one forward of the backbone per batch, whatever the number of heads."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # no dropout / drop path / BN updates in the frozen part
        return self

    def forward(self, images):
        with torch.no_grad():
            features = self.backbone(images)  # (B, D)
        return self.head(features.float())


def linear_head(dim: int, num_classes: int, batch_norm: bool = True) -> nn.Module:
    """MAE's probe head: BatchNorm without affine (a per-feature standardisation) + Linear; with
    `batch_norm=False` MoCo v3's (main_lincls.py): the Linear alone. Weights N(0, 0.01), bias 0."""
    linear = nn.Linear(dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not batch_norm:
        return linear
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def probe_head(dim: int, num_classes: int, args) -> nn.Module:
    """The trainable part of --protocol: MAE's BN + Linear, MoCo v3's Linear or the 70 heads."""
    if args.protocol == 'lincls_grafted':
        num_heads = len(SWEEP_BASE_LRS) * len(SWEEP_WEIGHT_DECAYS)
        return SweepHeads(num_heads, dim, num_classes)
    return linear_head(dim, num_classes, batch_norm=args.protocol == 'linear')


def probe_optimizer(head, args, total_batch: int):
    """LARS (MAE), SGD momentum 0.9 (MoCo v3's main_lincls.py) or the sweep's plain SGD."""
    if args.protocol == 'lincls_grafted':
        head_lrs, head_wds = sweep_grid(total_batch)
        return SweepSGD(head.parameters(), head_lrs, head_wds)
    if args.protocol == 'lincls_mocov3':
        return torch.optim.SGD(
            head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    groups = [{'params': list(head.parameters()), 'weight_decay': args.weight_decay}]
    return lars(groups, args.lr)


def probe_schedule(optimizer, args, updates: int):
    """MAE's warm-up + cosine per update, or the official lincls files' cosine per epoch."""
    if args.protocol == 'linear':
        return cosine_lr_scheduler(optimizer, args.epochs, args.warmup_epochs, args.min_lr, updates)
    return EpochCosine(optimizer, args.epochs, updates)


def check_probe_checkpoint(backbone_id: float, args):
    """The `validate` of checkpoint.resume: only a probe of this protocol and backbone."""

    def validate(path, saved):
        saved_args = saved.get('args') or {}
        protocol = saved_args.get('protocol')
        if protocol not in LINEAR_PROTOCOLS:
            raise InputError(
                f'{path} was written by another script (pre-training or fine-tuning), '
                f'not by a linear probe: give main_linprobe.py its own --output_dir'
            )
        if protocol != args.protocol:
            raise InputError(
                f'{path} is a --protocol {protocol} probe, not {args.protocol}: use a fresh '
                f'--output_dir, or --protocol {protocol} to continue it'
            )
        saved_id = saved.get('backbone_fingerprint')
        # A tolerance, not ==: a GPU's reduction order may differ in the last bits from one card
        # to another.
        if saved_id is None or not math.isclose(saved_id, backbone_id, rel_tol=1e-9):
            other = saved_args.get('checkpoint')
            if other == args.checkpoint:
                which = f'of {other} with other weights (the file or --seed changed)'
            else:
                which = f'of another backbone ({other}), not of {args.checkpoint}'
            raise InputError(
                f'{path} is a linear probe {which}: use a fresh --output_dir or delete that file'
            )

    return validate


def cached_features(backbone, dataset, device, args) -> TensorDataset:
    """The features of a data set without augmentation, extracted once (on the CPU)."""
    features, labels = extract_features(backbone, dataset, device, args)
    return TensorDataset(features.cpu(), labels.cpu())


def probe_model(backbone, head, train_set, eval_sets: dict, device, args) -> tuple:
    """(model, train loader, {name: eval loader}): the head alone on cached features
    (--cache_features), else the head behind the frozen backbone (FrozenProbe) on images."""
    if args.cache_features:
        # Without augmentation the features are the same every epoch: computed once; tensors
        # need no loader workers.
        train_set = cached_features(backbone, train_set, device, args)
        cached = {}
        for name, dataset in eval_sets.items():
            cached[name] = cached_features(backbone, dataset, device, args)
        eval_sets = cached
        model = head
        loader_args = argparse.Namespace(**vars(args))
        loader_args.num_workers = 0
    else:
        model = FrozenProbe(backbone, head).to(device)
        loader_args = args
    random_samples = not args.cache_features
    loader = data.build_loader(train_set, loader_args, is_train=True, random_samples=random_samples)
    loaders = {}
    for name, dataset in eval_sets.items():
        loaders[name] = data.build_loader(dataset, loader_args, is_train=False)
    return model, loader, loaders


def sweep_stats(model, loaders: dict, device, args) -> dict:
    """The chosen head (best top-1 on the held-out part of train, or on val) and its val top-1 and
    top-5 (%)."""
    val = head_accuracies(model, loaders['val'], device)
    chosen_on = val
    if 'select' in loaders:
        chosen_on = head_accuracies(model, loaders['select'], device)
    head = best_head(chosen_on['acc1'])
    print(
        f'best head {head}: lr {SWEEP_BASE_LRS[head // 2]:g} per 256, weight decay '
        f'{SWEEP_WEIGHT_DECAYS[head % 2]:g}; selection top-1 {chosen_on["acc1"][head]:.2f}, '
        f'val top-1 {val["acc1"][head]:.2f}'
    )
    return {
        'acc1': val['acc1'][head].item(),
        'acc5': val['acc5'][head].item(),
        'select_acc1': chosen_on['acc1'][head].item(),
        'head': head,
    }


def probe_sets(train_set, val_set, args) -> tuple:
    """(training set, {'val': ..., 'select': ...}): the sweep holds out part of train to choose its
    head on ('select'), unless --select_on_val (then val chooses, as the Layer Grafted code)."""
    sets = {'val': val_set}
    if args.protocol == 'lincls_grafted' and not args.select_on_val:
        train_set, sets['select'] = holdout_split(
            train_set, val_set.transform, args.sweep_holdout, args.seed
        )
    return train_set, sets


def linear_probe(backbone, train_set, val_set, num_classes, device, args) -> dict:
    """Trains the head(s) of --protocol, saved with optimizer, scaler and RNG each epoch
    (checkpoint-last.pth), resumed exactly. Returns the last epoch's val acc1 and acc5 (%) and the
    best acc1 (of the chosen head, for the sweep)."""
    backbone_id = backbone_fingerprint(backbone)
    sweep = args.protocol == 'lincls_grafted'
    head = probe_head(backbone.num_features, num_classes, args).to(device)
    train_set, sets = probe_sets(train_set, val_set, args)
    model, loader, loaders = probe_model(backbone, head, train_set, sets, device, args)
    train_model = model
    if args.distributed:
        # BatchNorm statistics over the whole batch (SyncBatchNorm runs on CUDA only).
        if device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = wrap_ddp(model, device, args.gpu)
    total_batch = total_batch_size(args.batch_size, 1, get_world_size())
    optimizer = probe_optimizer(head, args, total_batch)
    lr_scheduler = probe_schedule(optimizer, args, updates_per_epoch(len(loader), accum_iter=1))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    resumed = checkpoint.resume(
        args,
        head,
        optimizer,
        scaler,
        validate=check_probe_checkpoint(backbone_id, args),
        same_run=checkpoint.SCRIPT_SAME_RUN['main_linprobe.py'],
    )
    start_epoch = checkpoint.start_epoch(resumed, args.start_epoch)
    best = 0.0
    if resumed:
        best = resumed['best_acc1']
    log_writer = tensorboard_writer(args.log_dir)
    # The probes take no --accum_iter and no --clip_grad.
    loop = LoopSettings(
        device,
        optimizer,
        lr_scheduler,
        scaler,
        amp=args.amp,
        print_freq=args.print_freq,
        log_writer=log_writer,
    )
    features_from = 'images through the frozen backbone'
    if args.cache_features:
        features_from = 'cached features'
    criterion = nn.CrossEntropyLoss()
    if sweep:
        lr = f'{len(SWEEP_BASE_LRS) * len(SWEEP_WEIGHT_DECAYS)} heads'
        criterion = sweep_loss
    else:
        lr = f'lr {args.lr:.3g}'
    print(
        f'linear probe ({args.protocol}): {lr}, total batch {total_batch}, '
        f'{features_from}, epochs {start_epoch}..{args.epochs - 1}'
    )
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_model, criterion, loader, loop, epoch)
        stats = probe_stats(model, loaders, device, args)
        best = max(best, stats['acc1'])
        state = checkpoint.training_state(
            args,
            epoch,
            head,
            optimizer,
            scaler,
            acc1=stats['acc1'],
            best_acc1=best,
            backbone_fingerprint=backbone_id,
        )
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if log_writer is not None:
            log_writer.add_scalar('test/acc1', stats['acc1'], epoch)
        logged = {f'train_{name}': value for name, value in train_stats.items()}
        logged.update({f'test_{name}': value for name, value in stats.items()})
        logged['epoch'] = epoch
        log_json(args.output_dir, logged)
    if log_writer is not None:
        log_writer.close()
    if not stats:  # resumed from the last epoch: nothing left to train, report the head as it is
        stats = probe_stats(model, loaders, device, args)
    stats['best_acc1'] = best
    return stats


def probe_stats(model, loaders: dict, device, args) -> dict:
    """Val top-1/top-5 (%) of the head, or of the sweep's chosen head (with its index)."""
    if args.protocol == 'lincls_grafted':
        return sweep_stats(model, loaders, device, args)
    stats = evaluate(model, loaders['val'], device, args.amp, args.print_freq)
    return {'acc1': stats['acc1'], 'acc5': stats['acc5']}
