"""Frozen-feature evaluation of a pre-trained ViT backbone, chosen by --protocol:
- linear: BatchNorm (no affine) + Linear head on the frozen features, LARS (MAE's main_linprobe.py).
- lincls_mocov3: Linear head, SGD momentum 0.9, cosine per epoch (MoCo v3's main_lincls.py).
- lincls_grafted: 70 heads in one pass, the best kept (Layer Grafted's main_lincls_sweep.py).
- logreg: few-shot L2-regularised multinomial logistic regression by L-BFGS (Layer Grafted's 1 %).
- knn:    DINO's weighted k-nearest-neighbour vote.

One process:  python main_linprobe.py --checkpoint output/mimco/checkpoint-last.pth --protocol knn
Many GPUs:    torchrun --nproc_per_node 8 main_linprobe.py --checkpoint mimco_vits.pth \
                  --data_path /data/imagenet --batch_size 2048
"""

import argparse

import torch

from engine_finetune import check_knn_args, knn_evaluate, logistic_regression_accuracy
from engine_probe import LINEAR_PROTOCOLS, linear_probe
from util import data, subsets, transforms
from util.architectures import DIGITS_MODEL, default_model
from util.dist import get_world_size
from util.errors import InputError, run_main
from util.features import frozen_backbone
from util.logging import add_run_args, run_header, setup_run, summarize
from util.lr_sched import absolute_lr, total_batch_size


def get_args_parser():
    p = argparse.ArgumentParser('mimco frozen-feature evaluation', add_help=False)
    p.add_argument_group('Protocol').add_argument(
        '--protocol',
        default='linear',
        choices=list(LINEAR_PROTOCOLS) + ['logreg', 'knn'],
        help="linear probe: MAE's (linear), MoCo v3's main_lincls.py (lincls_mocov3), Layer "
        "Grafted's 70-head sweep (lincls_grafted); few-shot logistic regression (logreg, Layer "
        'Grafted); weighted kNN (DINO)',
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
    linear = p.add_argument_group('Linear probe (--protocol linear, lincls_mocov3, lincls_grafted)')
    linear.add_argument('--epochs', default=90, type=int, help='linear probe epochs')
    linear.add_argument(
        '--warmup_epochs',
        default=None,
        type=int,
        help='warm-up epochs of --protocol linear (default 10; the lincls protocols have none)',
    )
    linear.add_argument(
        '--optimizer',
        default='lars',
        choices=['lars', 'sgd'],
        help='lars (MAE); sgd is now --protocol lincls_mocov3',
    )
    linear.add_argument(
        '--blr',
        type=float,
        help='base lr per 256 images (default 0.1 as MAE, 32 with LARS on digits; 3 for '
        'lincls_mocov3, as MoCo v3 for ViTs)',
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
    linear.add_argument(
        '--sweep_holdout',
        default=0.1,
        type=float,
        help='lincls_grafted: fraction of train held out (seeded by --seed) to choose the head on',
    )
    linear.add_argument(
        '--select_on_val',
        action='store_true',
        help='lincls_grafted: choose the best head on val, as the Layer Grafted code (the val '
        'accuracy is then optimistic)',
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


def default_blr(args, digits: bool) -> float:
    """0.1 as MAE, but 32 with LARS on digits; 3 for lincls_mocov3 (MoCo v3's CONFIG.md for ViTs:
    --lr 3 at batch 1024, lr 12).

    LARS moves a weight by lr x 0.001 of its norm per step, so the head moves with
    epochs x N x blr / 256: digits' 1,437 images need a far larger blr (demo MoCo v3, 90 epochs:
    blr 0.1 -> 34 %, 8 -> 96 %, 32 -> 95 %).
    """
    if args.protocol == 'lincls_mocov3':
        return 3.0
    if digits:
        return 32.0
    return 0.1


def check_probe_args(args) -> None:
    """The flags a linear-probe protocol takes: the official lincls files have no warm-up, the
    sweep its own lr and weight decay grid."""
    if args.optimizer == 'sgd':
        raise InputError(
            "--optimizer sgd is now --protocol lincls_mocov3 (MoCo v3's main_lincls.py: no BN, "
            'no warm-up, cosine per epoch): use that'
        )
    lincls = args.protocol in LINEAR_PROTOCOLS and args.protocol != 'linear'
    if lincls and args.warmup_epochs:
        raise InputError(
            f'--warmup_epochs: --protocol {args.protocol} has no warm-up, as its official code; '
            f'drop the flag or use --protocol linear'
        )
    sweep_flags = args.blr is not None or args.lr is not None or args.weight_decay
    if args.protocol == 'lincls_grafted' and sweep_flags:
        raise InputError(
            '--blr, --lr and --weight_decay: --protocol lincls_grafted trains one head per lr '
            'and weight decay of its grid; drop them'
        )


def resolve_args(args, digits: bool) -> None:
    """The defaults that depend on the data and the protocol: feature cache, blr, lr, warm-up."""
    check_probe_args(args)
    check_knn_args(args)
    if args.cache_features is None:
        args.cache_features = digits
    if args.warmup_epochs is None:
        args.warmup_epochs = 0
        if args.protocol == 'linear':
            args.warmup_epochs = 10
    if args.blr is None and args.protocol != 'lincls_grafted':
        args.blr = default_blr(args, digits)
    if args.protocol in ('linear', 'lincls_mocov3'):
        total_batch = total_batch_size(args.batch_size, 1, get_world_size())
        args.lr = absolute_lr(args.lr, args.blr, total_batch)
    if args.checkpoint == 'random':
        args.model = default_model(args.model, None)


def main(args):
    draws = subsets.draw_count(args, few_shot=args.protocol == 'logreg')
    if draws > 1:  # each draw one run of main, in output_dir/draw<k>
        return subsets.over_draws(main, args, draws, args.protocol, args.checkpoint)
    device = setup_run(args)
    digits = data.dataset_name(args) == 'digits'
    resolve_args(args, digits)
    linear = args.protocol in LINEAR_PROTOCOLS
    # The data first, for the run header; their transforms once the backbone's input size is known.
    train_set = data.build_dataset(args, is_train=True, transform=None)
    val_set = data.build_dataset(args, is_train=False, transform=None)
    total_batch = None
    if linear and args.protocol != 'lincls_grafted':  # the sweep's lrs: engine_probe prints them
        total_batch = total_batch_size(args.batch_size, 1, get_world_size())
    run_header(args, 'main_linprobe.py', len(train_set), len(val_set), total_batch)
    backbone = frozen_backbone(
        args.checkpoint, args.model, args.input_size, args.global_pool, args.seed
    ).to(device)
    # What the file holds, when --input_size and --global_pool leave it open.
    args.input_size = backbone.patch_embed.img_size[0]
    args.global_pool = backbone.global_pool == 'avg'

    # MAE's resizes are bicubic, the official lincls files' (torchvision's default) bilinear.
    val_set.transform = transforms.eval_transform(args)
    train_set.transform = transforms.eval_transform(args)
    if linear and not args.cache_features and not digits:
        if args.protocol == 'linear':
            train_set.transform = transforms.mae_linprobe_view(args)
        else:
            interpolation = transforms.eval_interpolation(args)
            train_set.transform = transforms.crop_flip_view(args, interpolation)
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
