"""Frozen-feature evaluation of a pre-trained ViT backbone, chosen by --protocol:
- linear: BatchNorm (no affine) + Linear head on the frozen features, LARS (MAE) or SGD (MoCo v3).
- logreg: few-shot L2-regularised multinomial logistic regression by L-BFGS (Layer Grafted's 1 %).
- knn:    DINO's weighted k-nearest-neighbour vote.

One process:  python main_linprobe.py --checkpoint output/mimco/checkpoint-last.pth --protocol knn
Many GPUs:    torchrun --nproc_per_node 8 main_linprobe.py --checkpoint mimco_vits.pth \
                  --data_path /data/imagenet --batch_size 2048
"""

import argparse
import math
import os

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import TensorDataset

from engine_finetune import (
    check_knn_args,
    evaluate,
    extract_features,
    knn_evaluate,
    logistic_regression_accuracy,
    train_one_epoch,
)
from util import checkpoint, data, subsets, transforms
from util.architectures import DIGITS_MODEL, default_model
from util.dist import get_world_size, wrap_ddp
from util.errors import InputError, run_main
from util.features import backbone_fingerprint, frozen_backbone
from util.lars import lars
from util.logging import (
    add_run_args,
    log_json,
    run_header,
    setup_run,
    summarize,
    tensorboard_writer,
)
from util.lr_sched import absolute_lr, cosine_lr_scheduler, total_batch_size, updates_per_epoch


def get_args_parser():
    p = argparse.ArgumentParser('mimco frozen-feature evaluation', add_help=False)
    p.add_argument_group('Protocol').add_argument(
        '--protocol',
        default='linear',
        choices=['linear', 'logreg', 'knn'],
        help='linear probe (MAE), few-shot logistic regression (Layer Grafted), '
        'weighted kNN (DINO)',
    )
    model = p.add_argument_group('Model')
    model.add_argument(
        '--checkpoint',
        '--finetune',
        default='random',
        dest='checkpoint',
        help='backbone (MoCo v3, DINO, MAE, timm, ours) or `random`, '
        'an untrained --model (also --finetune)',
    )
    model.add_argument(
        '--model',
        help=f"timm ViT name (default: the checkpoint's architecture; {DIGITS_MODEL} for random)",
    )
    model.add_argument(
        '--input_size', default=None, type=int, help="image size (default: the model's)"
    )
    model.add_argument(
        '--global_pool',
        action='store_true',
        help='features = mean of the normed patch tokens (not CLS)',
    )
    model.add_argument(
        '--batch_size', default=256, type=int, help='images (or cached features) per GPU'
    )

    # MAE's linear probe: LARS, blr 0.1, no weight decay, 90 epochs, 10 warm-up, total batch 16384.
    linear = p.add_argument_group('Linear probe (--protocol linear)')
    linear.add_argument('--epochs', default=90, type=int, help='linear probe epochs')
    linear.add_argument('--warmup_epochs', default=10, type=int, help='linear probe warm-up epochs')
    linear.add_argument(
        '--optimizer',
        default='lars',
        choices=['lars', 'sgd'],
        help='lars (MAE) or momentum sgd (MoCo v3)',
    )
    linear.add_argument(
        '--blr',
        type=float,
        help='base lr per 256 images (default 0.1 as MAE; 32 with LARS on digits)',
    )
    linear.add_argument(
        '--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)'
    )
    linear.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the cosine')
    linear.add_argument(
        '--weight_decay', default=0.0, type=float, help='weight decay of the linear head'
    )
    linear.add_argument(
        '--cache_features',
        default=None,
        action=argparse.BooleanOptionalAction,
        help='train the head on features extracted once '
        '(default on digits; off: crop + flip each epoch)',
    )
    linear.add_argument(
        '--crop_min', default=0.08, type=float, help='RandomResizedCrop min scale (no cache)'
    )

    logreg = p.add_argument_group(
        "Logistic regression (--protocol logreg, Layer Grafted's few-shot)"
    )
    logreg.add_argument(
        '--logreg_wd',
        default=None,
        type=float,
        help='L2 lambda in mean CE + lambda/2 |W|^2 '
        "(default 2.5e-4 / n_train, as Layer Grafted's code)",
    )
    logreg.add_argument('--logreg_iters', default=1000, type=int, help='L-BFGS iterations at most')

    knn = p.add_argument_group('kNN (--protocol knn)')
    knn.add_argument('--knn_k', default=20, type=int, help='neighbours that vote')
    knn.add_argument(
        '--knn_t', default=0.07, type=float, help='temperature of the exp(similarity / T) weights'
    )
    knn.add_argument(
        '--knn_chunk',
        default=256,
        type=int,
        help='val features per similarity block (chunk x N_train)',
    )

    data.add_data_args(p.add_argument_group('Data'))
    # --resume and --start_epoch are the linear probe's.
    add_run_args(p.add_argument_group('Run'), train=False)
    return p


class FrozenProbe(nn.Module):
    """Frozen backbone (always in eval(), no grad) + trainable head, for images augmented anew
    each epoch."""

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


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's probe head: BatchNorm without affine (a per-feature standardisation) + Linear."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def check_probe_checkpoint(backbone_id: float, args):
    """The `validate` of checkpoint.resume: only a linear probe of this backbone may be resumed."""

    def validate(path, saved):
        saved_args = saved.get('args') or {}
        if saved_args.get('protocol') != 'linear':
            raise InputError(
                f'{path} was written by another script (pre-training or fine-tuning), '
                f'not by a linear probe: give main_linprobe.py its own --output_dir'
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


def probe_optimizer(head, args):
    """LARS (MAE's probe) or SGD with momentum 0.9 (MoCo v3's) on the head's parameters."""
    if args.optimizer == 'lars':
        groups = [{'params': list(head.parameters()), 'weight_decay': args.weight_decay}]
        return lars(groups, args.lr)
    return torch.optim.SGD(
        head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )


def probe_model(backbone, head, train_set, val_set, device, args) -> tuple:
    """(model, train loader, val loader): the head alone on cached features (--cache_features),
    else the head behind the frozen backbone (FrozenProbe) on images."""
    if args.cache_features:
        # Without augmentation the features are the same every epoch: computed once; tensors
        # need no loader workers.
        train_set = cached_features(backbone, train_set, device, args)
        val_set = cached_features(backbone, val_set, device, args)
        model = head
        loader_args = argparse.Namespace(**vars(args))
        loader_args.num_workers = 0
    else:
        model = FrozenProbe(backbone, head).to(device)
        loader_args = args
    random_samples = not args.cache_features
    loader = data.build_loader(train_set, loader_args, is_train=True, random_samples=random_samples)
    val_loader = data.build_loader(val_set, loader_args, is_train=False)
    return model, loader, val_loader


def linear_probe(backbone, train_set, val_set, num_classes, device, args) -> dict:
    """Trains the head, saved with optimizer, scaler and RNG each epoch (checkpoint-last.pth),
    resumed exactly. Returns the last epoch's val acc1 and acc5 (%) and the best acc1."""
    backbone_id = backbone_fingerprint(backbone)
    head = linear_head(backbone.num_features, num_classes).to(device)
    model, loader, val_loader = probe_model(backbone, head, train_set, val_set, device, args)
    train_model = model
    if args.distributed:
        # BatchNorm statistics over the whole batch (SyncBatchNorm runs on CUDA only).
        if device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = wrap_ddp(model, device, args.gpu)
    optimizer = probe_optimizer(head, args)
    updates = updates_per_epoch(len(loader), accum_iter=1)
    lr_scheduler = cosine_lr_scheduler(
        optimizer, args.epochs, args.warmup_epochs, args.min_lr, updates
    )
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
    total_batch = total_batch_size(args.batch_size, 1, get_world_size())
    features_from = 'images through the frozen backbone'
    if args.cache_features:
        features_from = 'cached features'
    print(
        f'linear probe: lr {args.lr:.3g} ({args.optimizer}, total batch {total_batch}), '
        f'{features_from}, epochs {start_epoch}..{args.epochs - 1}'
    )
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            train_model,
            nn.CrossEntropyLoss(),
            loader,
            optimizer,
            lr_scheduler,
            scaler,
            device,
            epoch,
            amp=args.amp,
            print_freq=args.print_freq,
            log_writer=log_writer,
        )
        stats = evaluate(model, val_loader, device, args.amp, args.print_freq)
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
        stats = evaluate(model, val_loader, device, args.amp, args.print_freq)
    return {'acc1': stats['acc1'], 'acc5': stats['acc5'], 'best_acc1': best}


def default_blr(args, digits: bool) -> float:
    """0.1 as MAE, but 32 with LARS on digits.

    LARS moves a weight by lr x 0.001 of its norm per step, so the head moves with
    epochs x N x blr / 256: digits' 1,437 images need a far larger blr (demo MoCo v3, 90 epochs:
    blr 0.1 -> 34 %, 8 -> 96 %, 32 -> 95 %).
    """
    if digits and args.optimizer == 'lars':
        return 32.0
    return 0.1


def resolve_args(args, digits: bool) -> None:
    """The defaults that depend on the data and the protocol: feature cache, blr, lr."""
    if args.cache_features is None:
        args.cache_features = digits
    if args.blr is None:
        args.blr = default_blr(args, digits)
    if args.protocol == 'linear':
        total_batch = total_batch_size(args.batch_size, 1, get_world_size())
        args.lr = absolute_lr(args.lr, args.blr, total_batch)
    if args.checkpoint == 'random':
        args.model = default_model(args.model, None)
    check_knn_args(args)


def main(args):
    draws = subsets.draw_count(args, few_shot=args.protocol == 'logreg')
    if draws > 1:  # each draw one run of main, in output_dir/draw<k>
        return subsets.over_draws(main, args, draws, args.protocol, args.checkpoint)
    device = setup_run(args)
    digits = data.dataset_name(args) == 'digits'
    resolve_args(args, digits)
    linear = args.protocol == 'linear'
    # The data first, for the run header; their transforms once the backbone's input size is known.
    train_set = data.build_dataset(args, is_train=True, transform=None)
    val_set = data.build_dataset(args, is_train=False, transform=None)
    total_batch = None
    if linear:
        total_batch = total_batch_size(args.batch_size, 1, get_world_size())
    run_header(args, 'main_linprobe.py', len(train_set), len(val_set), total_batch)
    backbone = frozen_backbone(
        args.checkpoint, args.model, args.input_size, args.global_pool, args.seed
    ).to(device)
    # What the file holds, when --input_size and --global_pool leave it open.
    args.input_size = backbone.patch_embed.img_size[0]
    args.global_pool = backbone.global_pool == 'avg'

    val_set.transform = transforms.eval_transform(args)
    train_set.transform = transforms.eval_transform(args)
    if linear and not args.cache_features and not digits:
        train_set.transform = transforms.crop_flip_view(args)
    train_set = subsets.label_subset(train_set, args)
    num_classes = len(val_set.classes)
    if linear:
        before = {name: value.clone() for name, value in backbone.state_dict().items()}
        metrics = linear_probe(backbone, train_set, val_set, num_classes, device, args)
        changed = [
            name
            for name, value in backbone.state_dict().items()
            if not torch.equal(value, before[name])
        ]
        if changed:  # a bug, not a user error: the protocol's premise is broken
            raise RuntimeError(f'the linear probe changed the frozen backbone: {changed[:4]}')
    elif args.protocol == 'knn':
        metrics = knn_evaluate(
            backbone, train_set, val_set, device, args, args.knn_k, args.knn_t, args.knn_chunk
        )
    else:
        metrics = logistic_regression_accuracy(
            backbone, train_set, val_set, num_classes, device, args
        )
    metrics['n_train'] = len(train_set)
    metrics['n_val'] = len(val_set)
    features = 'CLS'
    if args.global_pool:
        features = 'avg pool'
    return summarize(args, args.protocol, f'{args.checkpoint}, {features}', metrics)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco frozen-feature evaluation', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
