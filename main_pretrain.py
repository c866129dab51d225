"""Pre-training: MimCo, MAE, MoCo v3 (and the teachers MimCo learns from), and MTL (MAE + MoCo v3 on
one encoder), chosen by --method; Layer Grafted Pre-training is MAE, then MoCo v3 with
--graft_pretrained and --lr_layer_wise (the reverse cascade: MoCo v3, then --method mae).

One process:  python main_pretrain.py --method mocov3 --epochs 100
Grafting:     python main_pretrain.py --method mocov3 --graft_pretrained mae.pth \\
                  --lr_layer_wise 0.1,0.1,1
Joint (MTL):  python main_pretrain.py --method mtl --mtl_cl_weight 1
Many GPUs:    torchrun --nproc_per_node 8 main_pretrain.py --method mimco \\
                  --teacher mocov3_vits.pth ...
"""

import argparse
import datetime
import os
import time

import torch

from engine import LoopSettings
from engine_finetune import knn_datasets, knn_evaluate
from engine_pretrain import train_one_epoch
from pretrain_flags import (
    add_graft_args,
    add_mae_args,
    add_mimco_args,
    add_mocov3_args,
    add_model_args,
    add_mtl_args,
    add_optimizer_args,
)
from pretrain_setup import (
    BACKBONE,
    build_model,
    build_momentum_schedule,
    build_optimizer,
    compile_for_training,
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
        choices=['mimco', 'mae', 'mocov3', 'mtl'],
        help='mimco: MIM from a contrastive teacher; mae (Layer Grafted stage 1); '
        'mocov3 (teacher; stage 2); mtl: MAE + MoCo v3 jointly on one encoder',
    )
    add_model_args(p.add_argument_group('Model'))
    add_mimco_args(p.add_argument_group('MimCo (--method mimco)'))
    add_mae_args(p.add_argument_group('MAE (--method mae, mtl)'))
    add_mocov3_args(p.add_argument_group('MoCo v3 (--method mocov3, mtl)'))
    add_mtl_args(p.add_argument_group('MTL: MAE + MoCo v3 on one encoder (--method mtl)'))
    add_graft_args(
        p.add_argument_group('Layer Grafted Pre-training, cascade stage 2 (--method mocov3, mae)')
    )
    add_optimizer_args(p.add_argument_group('Optimisation'))
    data_args = p.add_argument_group('Data')
    data_args.add_argument(
        '--crop_min',
        default=None,
        type=float,
        help="RandomResizedCrop min scale (mtl: of the MoCo v3 views; its MAE view: 0.2, MAE's)",
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
    train_model, teacher = compile_for_training(model, teacher, args, device)

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
    loop = LoopSettings.from_args(args, device, optimizer, lr_scheduler, scaler, log_writer)

    print(
        f'training {args.method} for epochs {start_epoch}..{args.epochs - 1}, '
        f'{len(loader)} steps each'
    )
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        stats = train_one_epoch(
            train_model, loader, loop, epoch, teacher=teacher, momentum_schedule=momentum_schedule
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
