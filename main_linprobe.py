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

from engine import cosine_lr_scheduler, evaluate, extract_features, knn_evaluate, lars, train_one_epoch
from models_vit import DIGITS_MODEL
from util import checkpoint, data
from util.features import center_normalize, frozen_backbone, logistic_regression, topk_accuracy
from util.dist import get_world_size
from util.errors import InputError, run_main
from util.logging import add_run_args, log_json, run_header, setup_run, summarize, tensorboard_writer


def get_args_parser():
    p = argparse.ArgumentParser('mimco frozen-feature evaluation', add_help=False)
    p.add_argument('--protocol', default='linear', choices=['linear', 'logreg', 'knn'],
                   help='linear probe (MAE), few-shot logistic regression (Layer Grafted), weighted kNN (DINO)')
    p.add_argument('--checkpoint', '--finetune', default='random', dest='checkpoint',
                   help='backbone (MoCo v3, DINO, MAE, timm, ours) or `random`, an untrained --model (also --finetune)')
    p.add_argument('--model', help=f"timm ViT name (default: the checkpoint's architecture; {DIGITS_MODEL} for random)")
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--global_pool', action='store_true', help='features = mean of the normed patch tokens (not CLS)')
    p.add_argument('--batch_size', default=256, type=int, help='images (or cached features) per GPU')
    # Linear probe (MAE: LARS, blr 0.1, no weight decay, 90 epochs, 10 warm-up, total batch 16384)
    p.add_argument('--epochs', default=90, type=int, help='linear probe epochs')
    p.add_argument('--warmup_epochs', default=10, type=int, help='linear probe warm-up epochs')
    p.add_argument('--optimizer', default='lars', choices=['lars', 'sgd'], help='lars (MAE) or momentum sgd (MoCo v3)')
    p.add_argument('--blr', type=float, help='base lr per 256 images (default 0.1 as MAE; 32 with LARS on digits)')
    p.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)')
    p.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the cosine')
    p.add_argument('--weight_decay', default=0.0, type=float, help='weight decay of the linear head')
    p.add_argument('--cache_features', default=None, action=argparse.BooleanOptionalAction,
                   help='train the head on features extracted once (default on digits; off: crop + flip each epoch)')
    p.add_argument('--crop_min', default=0.08, type=float, help='RandomResizedCrop min scale (no cache)')
    # Logistic regression (Layer Grafted's few-shot protocol)
    p.add_argument('--logreg_wd', default=None, type=float,
                   help="L2 lambda in mean CE + lambda/2 |W|^2 (default 2.5e-4 / n_train, as Layer Grafted's code)")
    p.add_argument('--logreg_iters', default=1000, type=int, help='L-BFGS iterations at most')
    p.add_argument('--knn_k', default=20, type=int, help='neighbours that vote')
    p.add_argument('--knn_t', default=0.07, type=float, help='temperature of the exp(similarity / T) weights')
    p.add_argument('--knn_chunk', default=256, type=int, help='val features per similarity block (chunk x N_train)')
    data.add_data_args(p)
    add_run_args(p, train=False)  # --resume, --start_epoch: the linear probe's
    return p


class FrozenProbe(nn.Module):
    """Frozen backbone (always in eval(), no grad) + trainable head, for per-epoch augmented images."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

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
            raise InputError(f'{path} was written by another script (pre-training or fine-tuning), '
                             f'not by a linear probe: give main_linprobe.py its own --output_dir')
        saved_id = saved.get('backbone_fingerprint')
        # A tolerance, not ==: a GPU's reduction order may differ in the last bits from one card to another.
        if saved_id is None or not math.isclose(saved_id, backbone_id, rel_tol=1e-9):
            other = saved_args.get('checkpoint')
            which = (f'of {other} with other weights (the file or --seed changed)' if other == args.checkpoint
                     else f'of another backbone ({other}), not of {args.checkpoint}')
            raise InputError(f'{path} is a linear probe {which}: use a fresh --output_dir or delete that file')
    return validate


def linear_probe(backbone, train_set, val_set, num_classes, device, args) -> dict:
    """Trains the head, saved with optimizer, scaler and RNG each epoch (checkpoint-last.pth), resumed exactly."""
    # A number that changes with any backbone weight: a resume checks it against its checkpoint's.
    backbone_id = sum(v.detach().double().sum().item() + v.detach().double().square().sum().item()
                      for v in backbone.state_dict().values() if v.is_floating_point())
    head = linear_head(backbone.num_features, num_classes).to(device)
    if args.cache_features:  # without augmentation the features are the same every epoch: computed once
        train_set, val_set = (TensorDataset(*(t.cpu() for t in extract_features(backbone, images, device, args)))
                              for images in (train_set, val_set))
        model, loader_args = head, argparse.Namespace(**{**vars(args), 'num_workers': 0})  # tensors need no workers
    else:
        model, loader_args = FrozenProbe(backbone, head).to(device), args
    loader = data.build_loader(train_set, loader_args, is_train=True, random_samples=not args.cache_features)
    val_loader = data.build_loader(val_set, loader_args, is_train=False)
    train_model = model
    if args.distributed:
        if device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    total_batch = args.batch_size * get_world_size()
    args.lr = args.lr or args.blr * total_batch / 256  # main() has set it for the run header
    optimizer = (lars([{'params': list(head.parameters()), 'weight_decay': args.weight_decay}], args.lr)
                 if args.optimizer == 'lars' else
                 torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay))
    lr_scheduler = cosine_lr_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    resumed = checkpoint.resume(args, head, optimizer, scaler, validate=check_probe_checkpoint(backbone_id, args),
                                same_run=checkpoint.SCRIPT_SAME_RUN['main_linprobe.py'])
    best = resumed['best_acc1'] if resumed else 0.0
    log_writer = tensorboard_writer(args.log_dir)
    print(f'linear probe: lr {args.lr:.3g} ({args.optimizer}, total batch {total_batch}), '
          f'{"cached features" if args.cache_features else "images through the frozen backbone"}, '
          f'epochs {args.start_epoch}..{args.epochs - 1}')
    stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_model, loader, optimizer, lr_scheduler, scaler, device, epoch,
                                      args, log_writer, criterion=nn.CrossEntropyLoss())
        stats = evaluate(model, val_loader, device, args)
        best = max(best, stats['acc1'])
        state = checkpoint.training_state(args, epoch, head, optimizer, scaler, acc1=stats['acc1'],
                                          best_acc1=best, backbone_fingerprint=backbone_id)
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if log_writer is not None:
            log_writer.add_scalar('test/acc1', stats['acc1'], epoch)
        log_json(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                   **{f'test_{k}': v for k, v in stats.items()}, 'epoch': epoch})
    if log_writer is not None:
        log_writer.close()
    if not stats:  # resumed from the last epoch: nothing left to train, report the head as it is
        stats = evaluate(model, val_loader, device, args)
    return {'acc1': stats['acc1'], 'acc5': stats['acc5'], 'best_acc1': best}


def main(args):
    device = setup_run(args)
    args.accum_iter, args.clip_grad = 1, None  # what engine.train_one_epoch reads
    digits = data.dataset_name(args) == 'digits'
    args.cache_features = digits if args.cache_features is None else args.cache_features
    if args.blr is None:
        # LARS moves a weight by lr x 0.001 of its norm per step, so the head moves with epochs x N x blr / 256:
        # digits' 1,437 images need a far larger blr (demo MoCo v3, 90 epochs: blr 0.1 -> 34 %, 8 -> 96 %, 32 -> 95 %).
        args.blr = 32.0 if digits and args.optimizer == 'lars' else 0.1
    if args.knn_k < 1 or args.knn_t <= 0 or args.knn_chunk < 1:
        raise InputError(f'--knn_k {args.knn_k}, --knn_t {args.knn_t}, --knn_chunk {args.knn_chunk}: '
                         f'k and the chunk must be at least 1 and the temperature positive')
    # The data first, for the run header; their transforms once the backbone's input size is known.
    train_set, val_set = (data.build_dataset(args, is_train, transform=None) for is_train in (True, False))
    linear = args.protocol == 'linear'
    total_batch = args.batch_size * get_world_size() if linear else None
    if linear:
        args.lr = args.lr or args.blr * total_batch / 256
    run_header(args, 'main_linprobe.py', len(train_set), len(val_set), total_batch)
    backbone = frozen_backbone(args).to(device)
    before = {k: v.clone() for k, v in backbone.state_dict().items()} if linear else None
    val_set.transform = data.eval_transform(args)
    augment = linear and not args.cache_features and not digits
    train_set.transform = data.crop_flip_view(args) if augment else data.eval_transform(args)
    train_set = data.label_subset(train_set, args)
    num_classes = len(val_set.classes)
    if linear:
        metrics = linear_probe(backbone, train_set, val_set, num_classes, device, args)
        changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
        if changed:  # a bug, not a user error: the protocol's premise is broken
            raise RuntimeError(f'the linear probe changed the frozen backbone: {changed[:4]}')
    elif args.protocol == 'knn':
        metrics = knn_evaluate(backbone, train_set, val_set, device, args, args.knn_k, args.knn_t, args.knn_chunk)
    else:
        (train_x, train_y), (val_x, val_y) = (extract_features(backbone, s, device, args) for s in (train_set, val_set))
        train_x, val_x = center_normalize(train_x, val_x)
        args.logreg_wd = 2.5e-4 / len(train_set) if args.logreg_wd is None else args.logreg_wd
        classifier = logistic_regression(train_x, train_y, num_classes, args.logreg_wd, args.logreg_iters)
        top1, top5 = topk_accuracy(classifier(val_x.double()), val_y, topk=(1, min(5, num_classes)))
        metrics = {'acc1': top1, 'acc5': top5}
    metrics.update(n_train=len(train_set), n_val=len(val_set))
    return summarize(args, args.protocol, f'{args.checkpoint}, {"avg pool" if args.global_pool else "CLS"}', metrics)


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('mimco frozen-feature evaluation', parents=[get_args_parser()]).parse_args())
