"""Pre-training: MimCo, MAE, MoCo v3 (and the teachers MimCo learns from), chosen by --method;
Layer Grafted Pre-training is MAE, then MoCo v3 with --graft_pretrained and --lr_layer_wise.

One process:  python main_pretrain.py --method mocov3 --epochs 100
Grafting:     python main_pretrain.py --method mocov3 --graft_pretrained mae.pth --lr_layer_wise 0.1,0.1,1
Many GPUs:    torchrun --nproc_per_node 8 main_pretrain.py --method mimco --teacher mocov3_vits.pth ...
"""
import argparse
import copy
import datetime
import functools
import os
import time

import torch
from torch.utils.data import TensorDataset, default_collate

from engine import cosine_lr_scheduler, knn_evaluate, train_one_epoch
from models_mocov3 import moco_momentum
from util import checkpoint, data, decode
from util.dist import get_world_size
from util.errors import run_main
from util.logging import add_run_args, log_json, run_header, setup_run, tensorboard_writer
from util.pretrain import BACKBONE, build_model, build_optimizer, resolve_defaults


def get_args_parser():
    p = argparse.ArgumentParser('mimco pre-training', add_help=False)
    p.add_argument('--method', default='mimco', choices=['mimco', 'mae', 'mocov3'],
                   help='mimco: MIM from a contrastive teacher; mae (Layer Grafted stage 1); mocov3 (teacher; stage 2)')
    p.add_argument('--batch_size', default=128, type=int, help='images per GPU (per process)')
    p.add_argument('--epochs', default=100, type=int, help='training epochs')
    p.add_argument('--accum_iter', default=1, type=int, help='batches of gradient accumulated per step')
    p.add_argument('--model', default='vit_digits_patch4_16', help='timm ViT to train (e.g. mocov3_vit_small)')
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--drop_path', default=None, type=float, help='stochastic depth (mimco 0.1, mocov3 0)')
    # MimCo
    p.add_argument('--teacher', default=None, help='frozen teacher checkpoint (MoCo v3, DINO, MAE, timm or ours)')
    p.add_argument('--teacher_model', default=None, help='timm name of the teacher (default: from the file)')
    p.add_argument('--teacher_target', default='auto', choices=['auto', 'backbone', 'head'],
                   help="CLS target: through the teacher's projector (head: required; auto: if any) or raw (backbone)")
    p.add_argument('--mask_type', default=None, choices=['block', 'random'], help='BEiT blocks (mimco); uniform (mae)')
    p.add_argument('--mask_ratio', default=None, type=float, help='fraction of patches masked (mimco 0.4, mae 0.75)')
    p.add_argument('--patch_loss', default='infonce', choices=['infonce', 'smoothl1', 'cosine'],
                   help='patch-level loss: intra-image InfoNCE, or the regression ablations')
    p.add_argument('--img_loss', default='infonce', choices=['infonce', 'cosine', 'none'], help='CLS-token loss')
    p.add_argument('--img_loss_weight', default=1.0, type=float, help='weight of the image-level loss')
    p.add_argument('--patch_temp', default=0.1, type=float, help='temperature of the patch InfoNCE')
    p.add_argument('--img_temp', default=0.2, type=float, help='temperature of the image InfoNCE')
    p.add_argument('--head_dim', default=2048, type=int, help='hidden width of the patch and CLS heads')
    p.add_argument('--head_layers', default=2, type=int, help='linear layers in each head')
    p.add_argument('--head_norm', default='bn', choices=['bn', 'none'],
                   help="bn: Linear (no bias), BatchNorm, ReLU as MoCo v3's projector; none: Linear, GELU (BEiT/iBOT)")
    p.add_argument('--decoder_embed_dim', default=512, type=int, help='width of the MAE decoder')
    p.add_argument('--decoder_depth', default=8, type=int, help='transformer blocks in the MAE decoder')
    p.add_argument('--decoder_num_heads', default=16, type=int, help='attention heads in the MAE decoder')
    p.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction,
                   help='MAE target: pixels normalised per patch (MAE, Sec. 3)')
    p.add_argument('--moco_dim', default=256, type=int, help='projector / predictor output dim')
    p.add_argument('--moco_mlp_dim', default=4096, type=int, help='projector / predictor hidden dim')
    p.add_argument('--moco_m', default=0.99, type=float, help='base momentum of the key encoder')
    p.add_argument('--moco_m_cos', default=True, action=argparse.BooleanOptionalAction, help='momentum to 1 by cosine')
    p.add_argument('--moco_t', default=0.2, type=float, help='InfoNCE temperature')
    p.add_argument('--stop_grad_conv1', default=True, action=argparse.BooleanOptionalAction,
                   help='freeze the random patch projection (MoCo v3, Sec. 5)')
    # Layer Grafted Pre-training, stage 2 (--method mocov3)
    p.add_argument('--graft_pretrained', help='stage-1 MAE backbone (ours or official) to start both MoCo v3 encoders')
    p.add_argument('--lr_layer_wise', default=None,
                   help='lr multipliers a,b,c of three equal groups of blocks (embeddings in the first, norm '
                        'and heads in the last; default 0.1,0.1,1 with --graft_pretrained, else one lr)')
    p.add_argument('--graft_freeze_blocks', default=0, type=int,
                   help='freeze the first N grafted blocks and the CLS token (official --fixTo N; 0 = none)')
    p.add_argument('--graft_l1_weight', default=0.0, type=float,
                   help='weight of an L1 pull towards the grafted weights (official ViT-L: 1e-5; 0 = off)')
    p.add_argument('--graft_l1_blocks', default=0, type=int,
                   help='the L1 pull covers the embeddings and the first N blocks (official ViT-L: 12)')
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'lars'], help='optimizer')
    p.add_argument('--opt_betas', default=None, type=float, nargs=2,
                   help='AdamW betas (mimco 0.9 0.98, mae 0.9 0.95, mocov3 0.9 0.999)')
    p.add_argument('--weight_decay', default=None, type=float, help='weight decay (mimco, mae 0.05; mocov3 0.1)')
    p.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)')
    p.add_argument('--blr', default=1.5e-4, type=float, help='base lr for a total batch of 256')
    p.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the cosine')
    p.add_argument('--warmup_epochs', default=None, type=int, help='linear warm-up (mimco 10, mae 40, mocov3 40)')
    p.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)')
    p.add_argument('--grad_ckpt', action='store_true', help='gradient checkpointing of the blocks')
    p.add_argument('--crop_min', default=None, type=float, help='RandomResizedCrop min scale')
    p.add_argument('--data_backend', default='pil', choices=decode.BACKENDS,
                   help='pil, torchvision (in the workers) or nvjpeg (mimco, mae: decode, crop, flip on the GPU)')
    p.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    p.add_argument('--knn_freq', default=None, type=int,
                   help='DINO kNN (k 20, T 0.07) on val every N epochs and the last (digits: default 5; else 0 = off)')
    data.add_data_args(p, subsets=False)
    add_run_args(p)
    return p


def knn_datasets(args, dataset) -> tuple:
    """The kNN monitor's bank (the training images) and queries (val), both with the eval transform."""
    bank = copy.copy(dataset)  # the same images (no second scan of a folder), another transform
    bank.transform = data.eval_transform(args)
    val = data.build_dataset(args, is_train=False, transform=data.eval_transform(args))
    if data.dataset_name(args) != 'digits':
        return bank, val
    # Digits: transformed once here, not at each evaluation (a third of its time; no random draw).
    cached = []
    for images in (bank, val):
        cached.append(TensorDataset(*default_collate([images[i] for i in range(len(images))])))  # (N, C, H, W), (N,)
        cached[-1].classes = images.classes
    return tuple(cached)


def main(args):
    device = setup_run(args)
    resolve_defaults(args)
    total_batch = args.batch_size * args.accum_iter * get_world_size()
    args.lr = args.blr * total_batch / 256 if args.lr is None else args.lr
    dataset = data.build_dataset(args, is_train=True, transform=None)  # its views come with the model's masks
    knn_sets = knn_datasets(args, dataset) if args.knn_freq else None
    run_header(args, 'main_pretrain.py', len(dataset), len(knn_sets[1]) if knn_sets else None, total_batch)
    model, teacher = build_model(args)
    dataset, loader = decode.build_pretrain_loader(args, dataset, getattr(model, 'mask_generator', None), device)
    backbone = getattr(model, BACKBONE[args.method])  # the ViT that pre-training trains
    backbone.set_grad_checkpointing(args.grad_ckpt)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        if args.method != 'mae' and device.type == 'cuda':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN in the MLP heads
        # One graph every step (static_graph; not with --accum_iter's no_sync); gradients in DDP's buckets.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None,
            static_graph=args.accum_iter == 1, gradient_as_bucket_view=True)
        model_without_ddp = model.module
    train_model = torch.compile(model) if args.compile else model
    if teacher is not None:
        teacher = torch.compile(teacher.to(device)) if args.compile else teacher.to(device)
    optimizer = build_optimizer(args, model_without_ddp)
    lr_scheduler = cosine_lr_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum_schedule = None if args.method != 'mocov3' else functools.partial(
        moco_momentum, base_m=args.moco_m, epochs=args.epochs, cosine=args.moco_m_cos)
    checkpoint.resume(args, model_without_ddp, optimizer, scaler,
                      same_run=checkpoint.SCRIPT_SAME_RUN['main_pretrain.py'])
    log_writer = tensorboard_writer(args.log_dir)
    print(f'training {args.method} for epochs {args.start_epoch}..{args.epochs - 1}, {len(loader)} steps each')
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        stats = train_one_epoch(train_model, loader, optimizer, lr_scheduler, scaler, device, epoch,
                                args, log_writer, teacher=teacher, momentum_schedule=momentum_schedule)
        stats['seconds'] = time.time() - epoch_start  # the training steps alone (the kNN monitor: knn_seconds)
        state = checkpoint.training_state(args, epoch, model_without_ddp, optimizer, scaler)
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if args.save_freq and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
            checkpoint.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
        stats = {f'train_{k}': v for k, v in stats.items()}
        if knn_sets and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
            knn_start = time.time()
            knn = knn_evaluate(backbone, *knn_sets, device, args)  # as main_linprobe.py --protocol knn
            seconds = time.time() - knn_start
            print(f'epoch {epoch}: kNN top-1 {knn["acc1"]:.2f}, top-5 {knn["acc5"]:.2f} ({seconds:.1f} s)')
            stats.update({f'knn_{k}': v for k, v in knn.items()}, knn_seconds=seconds)
            if log_writer is not None:
                for name, value in knn.items():
                    log_writer.add_scalar(f'knn/{name}', value, epoch)
        log_json(args.output_dir, {**stats, 'epoch': epoch})
    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start))}')


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('mimco pre-training', parents=[get_args_parser()]).parse_args())
