"""End-to-end fine-tuning of a pre-trained ViT (the BEiT/MAE recipe), also the 10 % semi-supervised
protocol (`--train_fraction 0.1` or `--subset_file 10percent.txt`, with `--init_from_projector` for
Layer Grafted's version).

One process:  python main_finetune.py --finetune output/mimco/checkpoint-last.pth
Many GPUs:    torchrun --nproc_per_node 8 main_finetune.py --finetune mimco_vits.pth --data_path /data/imagenet
"""
import argparse
import datetime
import os
import time

import torch
from timm.data import Mixup, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from engine import cosine_lr_scheduler, evaluate, train_one_epoch
from models_vit import DIGITS_MODEL
from util import backbones, checkpoint, data
from util.dist import get_world_size
from util.errors import InputError, run_main
from util.logging import add_run_args, log_json, run_header, setup_run, summarize, tensorboard_writer

# ImageNet gets the full BEiT/MAE recipe; the 8x8 digits get their own light view (util/data.py) and
# no Mixup/CutMix/erasing by default. A flag given on the command line always wins.
DATASET_DEFAULTS = {'imagenet': dict(mixup=0.8, cutmix=1.0, reprob=0.25),
                    'digits': dict(mixup=0.0, cutmix=0.0, reprob=0.0)}


def get_args_parser():
    p = argparse.ArgumentParser('mimco fine-tuning', add_help=False)
    p.add_argument('--batch_size', default=64, type=int, help='images per GPU (per process)')
    p.add_argument('--epochs', default=100, type=int, help='training epochs')
    p.add_argument('--accum_iter', default=1, type=int, help='batches of gradient accumulated per step')
    p.add_argument('--model', help=f"timm ViT name (default: the --finetune file's architecture, else {DIGITS_MODEL})")
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--drop_path', default=0.1, type=float, help='stochastic depth rate')
    p.add_argument('--global_pool', default=True, action='store_true', help='classify the patch-token mean (MAE)')
    p.add_argument('--cls_token', dest='global_pool', action='store_false', help='classify the CLS token, not the mean')
    p.add_argument('--finetune', default='', help='backbone (MoCo v3, DINO, MAE, timm, ours); none: from scratch')
    p.add_argument('--init_from_projector', action='store_true',
                   help="Layer Grafted's 10 %% protocol: the MoCo v3 projector's first layer before the classifier")
    p.add_argument('--opt_betas', default=(0.9, 0.999), type=float, nargs=2, help='AdamW betas')
    p.add_argument('--weight_decay', default=0.05, type=float, help='weight decay')
    p.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)')
    p.add_argument('--blr', default=5e-4, type=float, help='base lr for a total batch of 256')
    p.add_argument('--layer_decay', default=0.75, type=float, help='layer-wise lr decay (BEiT)')
    p.add_argument('--min_lr', default=1e-6, type=float, help='lr at the end of the cosine')
    p.add_argument('--warmup_epochs', default=5, type=int, help='linear warm-up epochs')
    p.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)')
    # Augmentation and regularisation (the RandAugment / erasing flags act on ImageNet-style data only)
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm RandAugment policy')
    p.add_argument('--color_jitter', default=None, type=float, help='colour jitter (off when --aa is set)')
    p.add_argument('--reprob', default=None, type=float, help='random erasing probability (0.25; digits 0)')
    p.add_argument('--remode', default='pixel', help='random erasing mode')
    p.add_argument('--recount', default=1, type=int, help='random erasing count')
    p.add_argument('--smoothing', default=0.1, type=float, help='label smoothing')
    p.add_argument('--mixup', default=None, type=float, help='Mixup alpha (0.8; digits 0 = off)')
    p.add_argument('--cutmix', default=None, type=float, help='CutMix alpha (1.0; digits 0 = off)')
    p.add_argument('--cutmix_minmax', default=None, type=float, nargs=2, help='CutMix min/max ratio')
    p.add_argument('--mixup_prob', default=1.0, type=float, help='probability of Mixup or CutMix per batch')
    p.add_argument('--mixup_switch_prob', default=0.5, type=float, help='probability of CutMix over Mixup')
    p.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'], help='Mixup mode')
    p.add_argument('--model_ema', action='store_true', help='keep (and evaluate) an EMA of the weights')
    p.add_argument('--model_ema_decay', default=0.9999, type=float, help='EMA decay')
    p.add_argument('--eval', action='store_true', help='only evaluate (the --resume or --finetune model)')
    data.add_data_args(p)
    add_run_args(p)
    return p


def build_backbone(args) -> torch.nn.Module:
    """A timm ViT without classifier, from --finetune (any format) or random; sets --input_size."""
    args.model = args.model or (None if args.finetune else DIGITS_MODEL)
    model = backbones.build_backbone(args.finetune, args.model, args.input_size, drop_path_rate=args.drop_path)
    args.input_size = model.patch_embed.img_size[0]
    return model


def add_classifier(model, args, num_classes: int) -> torch.nn.Module:
    if not args.global_pool and not model.has_class_token:
        raise InputError('--cls_token: this backbone has no class token; fine-tune it with the default '
                         'global pool (drop --cls_token)')
    if isinstance(model.fc_norm, torch.nn.Identity):
        # The final norm moves after the pooling (fc_norm). With global pool that is MAE's: a LayerNorm
        # on the average of the un-normed patch tokens, here from the pre-trained norm's weights, not
        # from scratch; on the CLS token it is the same function as before. Named fc_norm, it takes
        # the head's layer-decay scale 1, as in MAE's lr_decay (timm's puts `norm` a layer below).
        model.fc_norm, model.norm = model.norm, torch.nn.Identity()
    model.reset_classifier(num_classes, 'avg' if args.global_pool else 'token')
    if args.init_from_projector:  # Layer Grafted's 10 % protocol: the projector's first Linear, then the classifier
        projector = backbones.load_projector(args.finetune) if args.finetune else None
        if projector is None:
            raise InputError(f'--init_from_projector needs a --finetune checkpoint with a MoCo v3 projector '
                             f'(base_encoder.head); {args.finetune or "no --finetune"} has none: drop the '
                             f'flag, or fine-tune a MoCo v3 or grafted checkpoint')
        layer = torch.nn.Linear(projector[0].in_features, projector[0].out_features)  # (D -> mlp_dim)
        layer.weight.data.copy_(projector[0].weight.data)  # MoCo v3's projector has no bias
        torch.nn.init.zeros_(layer.bias)
        model.head = torch.nn.Sequential(layer, torch.nn.Linear(layer.out_features, num_classes))
    if args.finetune:
        classifier = model.head[-1] if args.init_from_projector else model.head
        trunc_normal_(classifier.weight, std=2e-5)  # MAE: a near-zero start for the new classifier
    return model


def layer_decay_groups(model, args) -> list:
    """BEiT/MAE layer-wise lr decay (timm); the final norm, as fc_norm (add_classifier), at scale 1."""
    return param_groups_layer_decay(model, args.weight_decay, layer_decay=args.layer_decay,
                                    no_weight_decay_list=model.no_weight_decay())


def resolve_defaults(args) -> None:
    for name, value in DATASET_DEFAULTS['digits' if data.dataset_name(args) == 'digits' else 'imagenet'].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def add_transforms(args, train_set, val_set):
    """The training view and the eval transform, at --input_size; returns the labelled training subset."""
    if data.dataset_name(args) == 'digits':
        train_set.transform = data.digits_view(args)
    else:
        train_set.transform = create_transform(
            args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation='bicubic', re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    val_set.transform = data.eval_transform(args)
    return data.label_subset(train_set, args)


def main(args):
    device = setup_run(args)
    resolve_defaults(args)
    # The data first, for the run header; their transforms once the backbone's input size is known.
    train_set, val_set = (data.build_dataset(args, is_train, transform=None) for is_train in (True, False))
    total_batch = args.batch_size * args.accum_iter * get_world_size()
    args.lr = args.blr * total_batch / 256 if args.lr is None else args.lr
    run_header(args, 'main_finetune.py', len(train_set), len(val_set), total_batch)
    model = build_backbone(args)
    train_set = add_transforms(args, train_set, val_set)
    num_classes = len(val_set.classes)
    model = add_classifier(model, args, num_classes)
    loader = data.build_loader(train_set, args, is_train=True)
    val_loader = data.build_loader(val_set, args, is_train=False)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    # After DDP, which broadcast rank 0's weights: every rank's EMA starts from the same model.
    model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay) if args.model_ema else None
    train_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(layer_decay_groups(model_without_ddp, args), lr=args.lr,
                                  betas=tuple(args.opt_betas), fused=device.type == 'cuda')
    lr_scheduler = cosine_lr_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss()
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        if args.batch_size % 2:
            raise InputError(f'Mixup/CutMix pair images within a batch: --batch_size {args.batch_size} must '
                             f'be even (or turn them off with --mixup 0 --cutmix 0)')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # Mixup makes the (smoothed) soft targets itself
    extra = {'model_ema': model_ema} if model_ema is not None else {}
    same_run = checkpoint.SCRIPT_SAME_RUN['main_finetune.py']
    checkpoint.resume(args, model_without_ddp, optimizer, scaler, same_run=same_run, **extra)
    best_path = os.path.join(args.output_dir, 'checkpoint-best.pth')
    resumed = args.start_epoch > 0 and os.path.isfile(best_path)
    best_acc1 = checkpoint.load_file(best_path).get('acc1', 0.0) if resumed else 0.0
    if args.eval:
        stats = evaluate(model_without_ddp, val_loader, device, args)
        metrics = {'acc1': stats['acc1'], 'acc5': stats['acc5'], 'eval_only': True}
        return summarize(args, 'finetune', args.resume or args.finetune or 'random init', metrics)
    print(f'{len(train_set)} training images, {num_classes} classes; layer decay {args.layer_decay}, mixup '
          f'{args.mixup}, cutmix {args.cutmix}; epochs {args.start_epoch}..{args.epochs - 1}')
    log_writer = tensorboard_writer(args.log_dir)
    start, stats = time.time(), {}
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_model, loader, optimizer, lr_scheduler, scaler, device, epoch, args,
                                      log_writer, criterion=criterion, mixup_fn=mixup_fn, model_ema=model_ema)
        stats = {f'test_{k}': v for k, v in evaluate(model_without_ddp, val_loader, device, args).items()}
        if model_ema is not None:
            stats.update({f'test_ema_{k}': v for k, v in evaluate(model_ema.module, val_loader, device, args).items()})
        state = checkpoint.training_state(args, epoch, model_without_ddp, optimizer, scaler,
                                          acc1=stats['test_acc1'], **extra)
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if stats['test_acc1'] > best_acc1:
            best_acc1 = stats['test_acc1']
            checkpoint.save_checkpoint(state, best_path)
        print(f'epoch {epoch}: top-1 {stats["test_acc1"]:.2f} (best {best_acc1:.2f})')
        if log_writer is not None:
            for name, value in stats.items():
                log_writer.add_scalar(f'test/{name[5:]}', value, epoch)
        log_json(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()}, **stats, 'epoch': epoch})
    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start))}')
    metrics = {'acc1': stats.get('test_acc1'), 'acc5': stats.get('test_acc5'), 'best_acc1': best_acc1,
               'n_train': len(train_set)}
    return summarize(args, 'finetune', args.finetune or 'from scratch', metrics)


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('mimco fine-tuning', parents=[get_args_parser()]).parse_args())
