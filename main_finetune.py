"""End-to-end fine-tuning of a pre-trained ViT (the BEiT/MAE recipe), also the 10 % semi-supervised
protocol (`--train_fraction 0.1` or `--subset_file 10percent.txt`, with `--init_from_projector` for
Layer Grafted's version).

One process:  python main_finetune.py --finetune output/mimco/checkpoint-last.pth
Many GPUs:    torchrun --nproc_per_node 8 main_finetune.py --finetune mimco_vits.pth \
                  --data_path /data/imagenet
"""

import argparse
import datetime
import os
import time

import torch
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from engine import LoopSettings
from engine_finetune import evaluate, train_one_epoch
from util import backbones, checkpoint, classifiers, data, subsets, transforms
from util.architectures import DIGITS_MODEL, default_model
from util.dist import get_world_size, wrap_ddp
from util.errors import InputError, run_main
from util.logging import (
    add_run_args,
    log_json,
    run_header,
    setup_run,
    summarize,
    tensorboard_writer,
)
from util.lr_sched import absolute_lr, cosine_lr_scheduler, total_batch_size, updates_per_epoch

# ImageNet gets the full BEiT/MAE recipe; the 8x8 digits get their own light view (util/data.py) and
# no Mixup/CutMix/erasing by default. A flag given on the command line always wins.
DATASET_DEFAULTS = {
    'imagenet': dict(mixup=0.8, cutmix=1.0, reprob=0.25),
    'digits': dict(mixup=0.0, cutmix=0.0, reprob=0.0),
}


def get_args_parser():
    p = argparse.ArgumentParser('mimco fine-tuning', add_help=False)
    model = p.add_argument_group('Model')
    model.add_argument(
        '--model',
        help=f"timm ViT name (default: the --finetune file's architecture, else {DIGITS_MODEL})",
    )
    model.add_argument(
        '--input_size', default=None, type=int, help="image size (default: the model's)"
    )
    model.add_argument('--drop_path', default=0.1, type=float, help='stochastic depth rate')
    model.add_argument(
        '--global_pool',
        default=None,
        action=argparse.BooleanOptionalAction,
        help='classify the patch-token mean (default, MAE); --no-global_pool: the CLS token '
        '(default with --init_from_projector, as Layer Grafted)',
    )
    model.add_argument(
        '--cls_token',
        dest='global_pool',
        action='store_false',
        help='classify the CLS token, not the mean (the same as --no-global_pool)',
    )
    model.add_argument(
        '--finetune',
        default='',
        help='backbone (MoCo v3, DINO, MAE, timm, ours); none: from scratch',
    )
    model.add_argument(
        '--init_from_projector',
        action='store_true',
        help="Layer Grafted's 10 %% protocol: the MoCo v3 projector's first layer "
        'before the classifier',
    )

    optimisation = p.add_argument_group('Optimisation')
    optimisation.add_argument(
        '--batch_size', default=64, type=int, help='images per GPU (per process)'
    )
    optimisation.add_argument('--epochs', default=100, type=int, help='training epochs')
    optimisation.add_argument(
        '--accum_iter', default=1, type=int, help='batches of gradient accumulated per step'
    )
    optimisation.add_argument(
        '--opt_betas', default=(0.9, 0.999), type=float, nargs=2, help='AdamW betas'
    )
    optimisation.add_argument('--weight_decay', default=0.05, type=float, help='weight decay')
    optimisation.add_argument(
        '--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)'
    )
    optimisation.add_argument(
        '--blr', default=5e-4, type=float, help='base lr for a total batch of 256'
    )
    optimisation.add_argument(
        '--layer_decay', default=0.75, type=float, help='layer-wise lr decay (BEiT)'
    )
    optimisation.add_argument(
        '--min_lr', default=1e-6, type=float, help='lr at the end of the cosine'
    )
    optimisation.add_argument('--warmup_epochs', default=5, type=int, help='linear warm-up epochs')
    optimisation.add_argument(
        '--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)'
    )

    # The RandAugment and random erasing flags act on ImageNet-style data only.
    augmentation = p.add_argument_group('Augmentation and regularisation')
    augmentation.add_argument(
        '--aa', default='rand-m9-mstd0.5-inc1', help='timm RandAugment policy'
    )
    augmentation.add_argument(
        '--color_jitter', default=None, type=float, help='colour jitter (off when --aa is set)'
    )
    augmentation.add_argument(
        '--reprob', default=None, type=float, help='random erasing probability (0.25; digits 0)'
    )
    augmentation.add_argument('--remode', default='pixel', help='random erasing mode')
    augmentation.add_argument('--recount', default=1, type=int, help='random erasing count')
    augmentation.add_argument('--smoothing', default=0.1, type=float, help='label smoothing')
    augmentation.add_argument(
        '--mixup', default=None, type=float, help='Mixup alpha (0.8; digits 0 = off)'
    )
    augmentation.add_argument(
        '--cutmix', default=None, type=float, help='CutMix alpha (1.0; digits 0 = off)'
    )
    augmentation.add_argument(
        '--cutmix_minmax', default=None, type=float, nargs=2, help='CutMix min/max ratio'
    )
    augmentation.add_argument(
        '--mixup_prob', default=1.0, type=float, help='probability of Mixup or CutMix per batch'
    )
    augmentation.add_argument(
        '--mixup_switch_prob', default=0.5, type=float, help='probability of CutMix over Mixup'
    )
    augmentation.add_argument(
        '--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'], help='Mixup mode'
    )
    augmentation.add_argument(
        '--model_ema', action='store_true', help='keep (and evaluate) an EMA of the weights'
    )
    augmentation.add_argument('--model_ema_decay', default=0.9999, type=float, help='EMA decay')

    data.add_data_args(p.add_argument_group('Data'))
    run = p.add_argument_group('Run')
    run.add_argument(
        '--eval', action='store_true', help='only evaluate (a classifier file: with its own head)'
    )
    add_run_args(run)
    return p


def projector_classifier(path: str, num_classes: int) -> torch.nn.Sequential:
    """Layer Grafted's 10 % protocol: the MoCo v3 projector's first Linear, then the classifier."""
    projector = None
    if path:
        projector = backbones.load_projector(path)
    if projector is None:
        raise InputError(
            f'--init_from_projector needs a --finetune checkpoint with a MoCo v3 projector '
            f'(base_encoder.head); {path or "no --finetune"} has none: drop the '
            f'flag, or fine-tune a MoCo v3 or grafted checkpoint'
        )
    first = projector[0]
    # No bias, as MoCo v3's projector and Layer Grafted's tuneFromFirstFC (main_finetune_mae.py).
    layer = torch.nn.Linear(first.in_features, first.out_features, bias=False)  # (D -> mlp_dim)
    layer.weight.data.copy_(first.weight.data)
    classifier = torch.nn.Linear(layer.out_features, num_classes)
    return torch.nn.Sequential(layer, classifier)


def add_classifier(model, args, num_classes: int) -> torch.nn.Module:
    """The backbone with its classifier: on the patch-token mean (--global_pool) or the CLS token.

    The final norm moves after the pooling (fc_norm). With global pool that is MAE's: a LayerNorm
    on the average of the un-normed patch tokens, here from the pre-trained norm's weights, not
    from scratch; on the CLS token it is the same function as before. Named fc_norm, it takes the
    head's layer-decay scale 1, as in MAE's lr_decay (timm's puts `norm` a layer below).
    """
    if not args.global_pool and not model.has_class_token:
        raise InputError(
            '--cls_token: this backbone has no class token; fine-tune it with the default '
            'global pool (drop --cls_token)'
        )
    backbones.move_norm_after_pooling(model)
    if args.global_pool:
        model.reset_classifier(num_classes, 'avg')
    else:
        model.reset_classifier(num_classes, 'token')
    if args.init_from_projector:
        model.head = projector_classifier(args.finetune, num_classes)
    if args.finetune:
        classifier = model.head
        if args.init_from_projector:
            classifier = model.head[-1]
        trunc_normal_(classifier.weight, std=2e-5)  # MAE: a near-zero start for the new classifier
    if not args.init_from_projector:
        # Zero, as timm's head init in MAE's models_vit; Layer Grafted's projector path keeps
        # PyTorch's default for its classifier.
        torch.nn.init.zeros_(model.head.bias)
    return model


def layer_decay_groups(model, args) -> list:
    """BEiT/MAE layer-wise lr decay (timm); the final norm, as fc_norm (add_classifier), at
    scale 1."""
    return param_groups_layer_decay(
        model,
        args.weight_decay,
        layer_decay=args.layer_decay,
        no_weight_decay_list=model.no_weight_decay(),
    )


def set_dataset_defaults(args) -> None:
    """ImageNet's Mixup, CutMix and erasing, or none on digits; the CLS token for Layer Grafted's
    --init_from_projector, else global pool; a flag given always wins."""
    if args.global_pool is None:
        args.global_pool = not args.init_from_projector
    name = 'imagenet'
    if data.dataset_name(args) == 'digits':
        name = 'digits'
    for flag, value in DATASET_DEFAULTS[name].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def build_criterion(args, mixup_fn):
    """Soft-target CE after Mixup (its targets are soft and smoothed), else label smoothing."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing)
    return torch.nn.CrossEntropyLoss()


def best_accuracy_so_far(args, start_epoch: int, best_path: str) -> float:
    """The best val top-1 of a resumed run (0 for a fresh one): checkpoint-best.pth's."""
    if start_epoch == 0 or not os.path.isfile(best_path):
        return 0.0
    return checkpoint.load_file(best_path).get('acc1', 0.0)


def test_stats(model, model_ema, val_loader, device, args) -> dict:
    """Val top-1/top-5 and loss of the model (test_*) and of its EMA (test_ema_*)."""
    stats = {}
    for name, value in evaluate(model, val_loader, device, args.amp, args.print_freq).items():
        stats[f'test_{name}'] = value
    if model_ema is not None:
        ema = evaluate(model_ema.module, val_loader, device, args.amp, args.print_freq)
        for name, value in ema.items():
            stats[f'test_ema_{name}'] = value
    return stats


def main(args):
    draws = subsets.draw_count(args, few_shot=not args.eval)
    if draws > 1:  # each draw one fine-tune, in output_dir/draw<k>
        return subsets.over_draws(main, args, draws, 'finetune', args.finetune or 'from scratch')
    device = setup_run(args)
    set_dataset_defaults(args)
    # --eval of a classifier file (DeiT's release, a --finetune file): its own head and pooling.
    scored = classifiers.classifier_to_score(args.eval, args.resume, args.finetune)
    if scored:
        args.finetune = scored
        args.resume = ''
    args.model = default_model(args.model, args.finetune)
    # The data first, for the run header; their transforms once the backbone's input size is known.
    train_set = data.build_dataset(args, is_train=True, transform=None)
    val_set = data.build_dataset(args, is_train=False, transform=None)
    total_batch = total_batch_size(args.batch_size, args.accum_iter, get_world_size())
    args.lr = absolute_lr(args.lr, args.blr, total_batch)
    run_header(args, 'main_finetune.py', len(train_set), len(val_set), total_batch)

    # The backbone of --finetune (or a random one), then its classifier.
    model = backbones.build_backbone(
        args.finetune, args.model, args.input_size, drop_path_rate=args.drop_path
    )
    args.input_size = model.patch_embed.img_size[0]  # the file's, when --input_size is not given

    train_set.transform = transforms.finetune_view(args)
    val_set.transform = transforms.eval_transform(args)
    train_set = subsets.label_subset(train_set, args)
    num_classes = len(val_set.classes)
    classifier = None
    if scored:
        classifier, file_pool = classifiers.read_classifier(scored, num_classes)
        args.global_pool = file_pool
    model = add_classifier(model, args, num_classes)
    if classifier is not None:
        classifiers.load_classifier(model, classifier)
    loader = data.build_loader(train_set, args, is_train=True)
    val_loader = data.build_loader(val_set, args, is_train=False)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = wrap_ddp(model, device, args.gpu)
        model_without_ddp = model.module
    # After DDP, which broadcast rank 0's weights: every rank's EMA starts from the same model.
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay)
    train_model = model
    if args.compile:
        train_model = torch.compile(model)

    # AdamW with layer-wise lr decay; the lr follows warm-up + cosine per optimizer update (MAE).
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model_without_ddp, args),
        lr=args.lr,
        betas=tuple(args.opt_betas),
        fused=device.type == 'cuda',
    )
    updates = updates_per_epoch(len(loader), args.accum_iter)
    lr_scheduler = cosine_lr_scheduler(
        optimizer, args.epochs, args.warmup_epochs, args.min_lr, updates
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    mixup_fn = transforms.build_mixup(args, num_classes)
    criterion = build_criterion(args, mixup_fn)
    # Resume exactly: model, optimizer, scaler, EMA and every rank's RNG stream.
    extra = {}
    if model_ema is not None:
        extra['model_ema'] = model_ema
    same_run = checkpoint.SCRIPT_SAME_RUN['main_finetune.py']
    resumed = checkpoint.resume(
        args, model_without_ddp, optimizer, scaler, same_run=same_run, **extra
    )
    start_epoch = checkpoint.start_epoch(resumed, args.start_epoch)
    best_path = os.path.join(args.output_dir, 'checkpoint-best.pth')
    best_acc1 = best_accuracy_so_far(args, start_epoch, best_path)

    if args.eval:
        stats = evaluate(model_without_ddp, val_loader, device, args.amp, args.print_freq)
        metrics = {'acc1': stats['acc1'], 'acc5': stats['acc5'], 'eval_only': True}
        evaluated = args.resume or args.finetune or 'random init'
        return summarize(args, 'finetune', evaluated, metrics)

    print(
        f'{len(train_set)} training images, {num_classes} classes; layer decay '
        f'{args.layer_decay}, mixup {args.mixup}, cutmix {args.cutmix}; '
        f'epochs {start_epoch}..{args.epochs - 1}'
    )
    log_writer = tensorboard_writer(args.log_dir)
    loop = LoopSettings.from_args(args, device, optimizer, lr_scheduler, scaler, log_writer)
    start = time.time()
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            train_model, criterion, loader, loop, epoch, mixup_fn=mixup_fn, model_ema=model_ema
        )
        stats = test_stats(model_without_ddp, model_ema, val_loader, device, args)
        state = checkpoint.training_state(
            args, epoch, model_without_ddp, optimizer, scaler, acc1=stats['test_acc1'], **extra
        )
        # checkpoint-last.pth to resume from, checkpoint-best.pth to keep.
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if stats['test_acc1'] > best_acc1:
            best_acc1 = stats['test_acc1']
            checkpoint.save_checkpoint(state, best_path)
        print(f'epoch {epoch}: top-1 {stats["test_acc1"]:.2f} (best {best_acc1:.2f})')
        if log_writer is not None:
            for name, value in stats.items():
                log_writer.add_scalar(f'test/{name.removeprefix("test_")}', value, epoch)
        logged = {f'train_{name}': value for name, value in train_stats.items()}
        logged.update(stats)
        logged['epoch'] = epoch
        log_json(args.output_dir, logged)

    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start))}')
    metrics = {
        'acc1': stats.get('test_acc1'),
        'acc5': stats.get('test_acc5'),
        'best_acc1': best_acc1,
        'n_train': len(train_set),
    }
    return summarize(args, 'finetune', args.finetune or 'from scratch', metrics)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco fine-tuning', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
