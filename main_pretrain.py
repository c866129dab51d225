"""Pre-training: MimCo, MAE, MoCo v3 (and the teachers MimCo learns from), chosen by --method;
Layer Grafted Pre-training is MAE, then MoCo v3 with --graft_pretrained and --lr_layer_wise.

One process:  python main_pretrain.py --method mocov3 --epochs 100
Grafting:     python main_pretrain.py --method mocov3 --graft_pretrained mae.pth \\
                  --lr_layer_wise 0.1,0.1,1
Many GPUs:    torchrun --nproc_per_node 8 main_pretrain.py --method mimco \\
                  --teacher mocov3_vits.pth ...
"""

import argparse
import datetime
import os
import time

import torch

from engine_finetune import knn_datasets, knn_evaluate
from engine_pretrain import train_one_epoch
from pretrain_setup import (
    BACKBONE,
    build_model,
    build_momentum_schedule,
    build_optimizer,
    resolve_args,
    warn_accumulated_contrast,
)
from util import checkpoint, data, decode
from util.dist import get_world_size, wrap_ddp
from util.errors import run_main
from util.logging import add_run_args, log_json, run_header, setup_run, tensorboard_writer
from util.lr_sched import cosine_lr_scheduler, total_batch_size, updates_per_epoch


def get_args_parser():
    p = argparse.ArgumentParser('mimco pre-training', add_help=False)
    p.add_argument_group('Method').add_argument(
        '--method',
        default='mimco',
        choices=['mimco', 'mae', 'mocov3'],
        help='mimco: MIM from a contrastive teacher; mae (Layer Grafted stage 1); '
        'mocov3 (teacher; stage 2)',
    )
    add_model_args(p.add_argument_group('Model'))
    add_mimco_args(p.add_argument_group('MimCo (--method mimco)'))
    add_mae_args(p.add_argument_group('MAE (--method mae)'))
    add_mocov3_args(p.add_argument_group('MoCo v3 (--method mocov3)'))
    add_graft_args(p.add_argument_group('Layer Grafted Pre-training, stage 2 (--method mocov3)'))
    add_optimizer_args(p.add_argument_group('Optimisation'))
    data_args = p.add_argument_group('Data')
    data_args.add_argument(
        '--crop_min', default=None, type=float, help='RandomResizedCrop min scale'
    )
    data_args.add_argument(
        '--data_backend',
        default='pil',
        choices=decode.BACKENDS,
        help='pil, torchvision (in the workers) or nvjpeg '
        '(mimco, mae: decode, crop, flip on the GPU)',
    )
    data.add_data_args(data_args, subsets=False)
    run_args = p.add_argument_group('Run')
    run_args.add_argument(
        '--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs'
    )
    run_args.add_argument(
        '--knn_freq',
        default=None,
        type=int,
        help='DINO kNN (k 20, T 0.07) on val every N epochs and the last '
        '(digits: default 5; else 0 = off)',
    )
    add_run_args(run_args)
    return p


def add_model_args(group) -> None:
    group.add_argument(
        '--model', default='vit_digits_patch4_16', help='timm ViT to train (e.g. mocov3_vit_small)'
    )
    group.add_argument(
        '--input_size', default=None, type=int, help="image size (default: the model's)"
    )
    group.add_argument(
        '--drop_path', default=None, type=float, help='stochastic depth (mimco 0.1, mocov3 0)'
    )
    group.add_argument(
        '--grad_ckpt', action='store_true', help='gradient checkpointing of the blocks'
    )


def add_mimco_args(group) -> None:
    group.add_argument(
        '--teacher',
        default=None,
        help='frozen teacher checkpoint (MoCo v3, DINO, MAE, timm or ours)',
    )
    group.add_argument(
        '--teacher_model', default=None, help='timm name of the teacher (default: from the file)'
    )
    group.add_argument(
        '--teacher_target',
        default='auto',
        choices=['auto', 'backbone', 'head'],
        help="CLS target: through the teacher's projector (head: required; auto: if any) "
        'or raw (backbone)',
    )
    group.add_argument(
        '--mask_type',
        default=None,
        choices=['block', 'random'],
        help='BEiT blocks (mimco); uniform (mae)',
    )
    group.add_argument(
        '--mask_ratio',
        default=None,
        type=float,
        help='fraction of patches masked (mimco 0.4, mae 0.75)',
    )
    group.add_argument(
        '--patch_loss',
        default='infonce',
        choices=['infonce', 'smoothl1', 'l1', 'cosine'],
        help='patch-level loss: intra-image InfoNCE, or the regression ablations (l1: plain L1 '
        "to the teacher's tokens, the paper's baseline)",
    )
    group.add_argument(
        '--img_loss',
        default='infonce',
        choices=['infonce', 'cosine', 'none'],
        help='CLS-token loss',
    )
    group.add_argument(
        '--img_loss_weight', default=1.0, type=float, help='weight of the image-level loss'
    )
    group.add_argument(
        '--patch_temp', default=0.1, type=float, help='temperature of the patch InfoNCE'
    )
    group.add_argument(
        '--img_temp', default=0.2, type=float, help='temperature of the image InfoNCE'
    )
    group.add_argument(
        '--head_dim', default=2048, type=int, help='hidden width of the patch and CLS heads'
    )
    group.add_argument('--head_layers', default=2, type=int, help='linear layers in each head')
    group.add_argument(
        '--head_norm',
        default='bn',
        choices=['bn', 'none'],
        help="bn: Linear (no bias), BatchNorm, ReLU as MoCo v3's projector; "
        'none: Linear, GELU (BEiT/iBOT)',
    )


def add_mae_args(group) -> None:
    group.add_argument(
        '--decoder_embed_dim', default=512, type=int, help='width of the MAE decoder'
    )
    group.add_argument(
        '--decoder_depth', default=8, type=int, help='transformer blocks in the MAE decoder'
    )
    group.add_argument(
        '--decoder_num_heads', default=16, type=int, help='attention heads in the MAE decoder'
    )
    group.add_argument(
        '--norm_pix_loss',
        default=True,
        action=argparse.BooleanOptionalAction,
        help='MAE target: pixels normalised per patch (MAE, Sec. 3)',
    )


def add_mocov3_args(group) -> None:
    group.add_argument('--moco_dim', default=256, type=int, help='projector / predictor output dim')
    group.add_argument(
        '--moco_mlp_dim', default=4096, type=int, help='projector / predictor hidden dim'
    )
    group.add_argument(
        '--moco_m', default=0.99, type=float, help='base momentum of the key encoder'
    )
    group.add_argument(
        '--moco_m_cos',
        default=True,
        action=argparse.BooleanOptionalAction,
        help='momentum to 1 by cosine',
    )
    group.add_argument('--moco_t', default=0.2, type=float, help='InfoNCE temperature')
    group.add_argument(
        '--stop_grad_conv1',
        default=True,
        action=argparse.BooleanOptionalAction,
        help='freeze the random patch projection (MoCo v3, Sec. 5)',
    )


def add_graft_args(group) -> None:
    group.add_argument(
        '--graft_pretrained',
        help='stage-1 MAE backbone (ours or official) to start both MoCo v3 encoders',
    )
    group.add_argument(
        '--lr_layer_wise',
        default=None,
        help='lr multipliers a,b,c of three equal groups of blocks (embeddings in the first, '
        'norm and heads in the last; default 0.1,0.1,1 with --graft_pretrained, else one lr)',
    )
    group.add_argument(
        '--graft_freeze_blocks',
        default=0,
        type=int,
        help='freeze the first N grafted blocks and the CLS token (official --fixTo N; 0 = none)',
    )
    group.add_argument(
        '--graft_l1_weight',
        default=0.0,
        type=float,
        help='weight of an L1 pull towards the grafted weights (official ViT-L: 1e-5; 0 = off)',
    )
    group.add_argument(
        '--graft_l1_blocks',
        default=0,
        type=int,
        help='the L1 pull covers the embeddings and the first N blocks (official ViT-L: 12)',
    )


def add_optimizer_args(group) -> None:
    group.add_argument('--batch_size', default=128, type=int, help='images per GPU (per process)')
    group.add_argument('--epochs', default=100, type=int, help='training epochs')
    group.add_argument(
        '--accum_iter', default=1, type=int, help='batches of gradient accumulated per step'
    )
    group.add_argument('--optimizer', default='adamw', choices=['adamw', 'lars'], help='optimizer')
    group.add_argument(
        '--opt_betas',
        default=None,
        type=float,
        nargs=2,
        help='AdamW betas (mimco 0.9 0.98, mae 0.9 0.95, mocov3 0.9 0.999)',
    )
    group.add_argument(
        '--weight_decay',
        default=None,
        type=float,
        help='weight decay (mimco, mae 0.05; mocov3 0.1)',
    )
    group.add_argument(
        '--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)'
    )
    group.add_argument('--blr', default=1.5e-4, type=float, help='base lr for a total batch of 256')
    group.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the cosine')
    group.add_argument(
        '--warmup_epochs',
        default=None,
        type=int,
        help='linear warm-up (mimco 10, mae 40, mocov3 40)',
    )
    group.add_argument(
        '--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)'
    )


def distributed_model(model, args, device):
    """The model in DistributedDataParallel under torchrun (SyncBatchNorm in the heads on CUDA)."""
    if not args.distributed:
        return model
    if args.method != 'mae' and device.type == 'cuda':
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN in the MLP heads
    # One graph every step (static_graph; not with --accum_iter's no_sync); the gradients live in
    # DDP's buckets.
    static_graph = args.accum_iter == 1
    return wrap_ddp(
        model, device, args.gpu, static_graph=static_graph, gradient_as_bucket_view=True
    )


def save_checkpoints(args, epoch: int, model, optimizer, scaler) -> None:
    """checkpoint-last.pth every epoch, checkpoint-<epoch>.pth every --save_freq and at the end."""
    state = checkpoint.training_state(args, epoch, model, optimizer, scaler)
    checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
    if not args.save_freq:
        return
    if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))


def knn_monitor(backbone, knn_sets, device, args, epoch: int, log_writer) -> dict:
    """DINO's kNN of the backbone being trained, as main_linprobe.py --protocol knn scores it."""
    start = time.time()
    knn = knn_evaluate(backbone, *knn_sets, device, args)
    seconds = time.time() - start
    print(f'epoch {epoch}: kNN top-1 {knn["acc1"]:.2f}, top-5 {knn["acc5"]:.2f} ({seconds:.1f} s)')
    if log_writer is not None:
        for name, value in knn.items():
            log_writer.add_scalar(f'knn/{name}', value, epoch)
    stats = {f'knn_{name}': value for name, value in knn.items()}
    stats['knn_seconds'] = seconds
    return stats


def main(args):
    device = setup_run(args)
    resolve_args(args)
    warn_accumulated_contrast(args)
    total_batch = total_batch_size(args.batch_size, args.accum_iter, get_world_size())
    # The images without a transform: their views come with the model's masks.
    dataset = data.build_dataset(args, is_train=True, transform=None)
    knn_sets = None
    val_images = None
    if args.knn_freq:
        knn_sets = knn_datasets(args, dataset)
        val_images = len(knn_sets[1])
    run_header(args, 'main_pretrain.py', len(dataset), val_images, total_batch)

    model, teacher = build_model(args)
    mask_generator = getattr(model, 'mask_generator', None)
    dataset, loader = decode.build_pretrain_loader(args, dataset, mask_generator, device)
    backbone = getattr(model, BACKBONE[args.method])  # the ViT that pre-training trains
    backbone.set_grad_checkpointing(args.grad_ckpt)
    model.to(device)
    model_without_ddp = model
    model = distributed_model(model, args, device)
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if teacher is not None:
        teacher = teacher.to(device)
        if args.compile:
            teacher = torch.compile(teacher)

    optimizer = build_optimizer(args, model_without_ddp)
    updates = updates_per_epoch(len(loader), args.accum_iter)
    lr_scheduler = cosine_lr_scheduler(
        optimizer, args.epochs, args.warmup_epochs, args.min_lr, updates
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum_schedule = build_momentum_schedule(args)
    same_run = checkpoint.SCRIPT_SAME_RUN['main_pretrain.py']
    resumed = checkpoint.resume(args, model_without_ddp, optimizer, scaler, same_run=same_run)
    start_epoch = checkpoint.start_epoch(resumed, args.start_epoch)
    log_writer = tensorboard_writer(args.log_dir)

    print(
        f'training {args.method} for epochs {start_epoch}..{args.epochs - 1}, '
        f'{len(loader)} steps each'
    )
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        stats = train_one_epoch(
            train_model,
            loader,
            optimizer,
            lr_scheduler,
            scaler,
            device,
            epoch,
            amp=args.amp,
            accum_iter=args.accum_iter,
            clip_grad=args.clip_grad,
            print_freq=args.print_freq,
            teacher=teacher,
            momentum_schedule=momentum_schedule,
            log_writer=log_writer,
        )
        # The training steps alone (the kNN monitor's time is knn_seconds).
        stats['seconds'] = time.time() - epoch_start
        save_checkpoints(args, epoch, model_without_ddp, optimizer, scaler)
        stats = {f'train_{name}': value for name, value in stats.items()}
        last_epoch = epoch + 1 == args.epochs
        if knn_sets and ((epoch + 1) % args.knn_freq == 0 or last_epoch):
            stats.update(knn_monitor(backbone, knn_sets, device, args, epoch, log_writer))
        stats['epoch'] = epoch
        log_json(args.output_dir, stats)

    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start))}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco pre-training', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
