"""Pre-training: MimCo, MAE, MoCo v3 (and the teachers MimCo learns from), chosen by --method;
Layer Grafted Pre-training is MAE, then MoCo v3 with --graft_pretrained and --lr_layer_wise.

One process:  python main_pretrain.py --method mocov3 --epochs 100
Grafting:     python main_pretrain.py --method mocov3 --graft_pretrained mae/checkpoint-last.pth \
                  --lr_layer_wise 0.1,0.1,1
Many GPUs:    torchrun --nproc_per_node 8 main_pretrain.py --method mimco --teacher mocov3_vits.pth ...
"""
import argparse
import datetime
import functools
import json
import os
import random
import time

import numpy as np
import timm
import torch
from timm.optim import param_groups_weight_decay

import models_mimco
from engine import cosine_lr_scheduler, lars, memory_format, train_one_epoch
from util import checkpoint, decode, figures
from util.graft import (EMBEDDINGS, block_index, graft_encoder, graft_param_groups,
                        parse_lr_layer_wise)
from util.dist import init_distributed_mode, is_main_process, get_world_size
from util.errors import InputError, run_main
from util.logging import log_json, tensorboard_writer
from util.masking import MaskNoiseGenerator, build_mask_generator, check_mask_ratio
from util.schedules import moco_momentum

# Per-method defaults where the papers differ; a flag given on the command line always wins.
METHOD_DEFAULTS = {
    'mimco': dict(mask_type='block', mask_ratio=0.4, weight_decay=0.05, opt_betas=(0.9, 0.98),
                  warmup_epochs=10, crop_min=0.2, drop_path=0.1),
    'mocov3': dict(weight_decay=0.1, opt_betas=(0.9, 0.999), warmup_epochs=40, crop_min=0.08,
                   drop_path=0.0),
    'mae': dict(mask_type='random', mask_ratio=0.75, weight_decay=0.05, opt_betas=(0.9, 0.95),
                warmup_epochs=40, crop_min=0.2, drop_path=0.0),
}
# Layer Grafted stage 2: which parameters train with the first third of the blocks (the rest of
# the non-block parameters - final norm, projector, predictor - train with the last third).


def get_args_parser():
    p = argparse.ArgumentParser('mimco pre-training', add_help=False)
    p.add_argument('--method', default='mimco', choices=['mimco', 'mae', 'mocov3'],
                   help='mimco: MIM from a frozen contrastive teacher; mae: masked autoencoder (Layer '
                        'Grafted stage 1); mocov3: contrastive (makes teachers; Layer Grafted stage 2)')
    p.add_argument('--batch_size', default=128, type=int, help='images per GPU (per process)')
    p.add_argument('--epochs', default=100, type=int, help='training epochs')
    p.add_argument('--accum_iter', default=1, type=int, help='batches of gradient accumulated per step')
    # Model
    p.add_argument('--model', default='vit_digits_patch4_16', type=str,
                   help='timm ViT name of the student / encoder (ours: vit_digits_patch4_16, mocov3_vit_small)')
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--drop_path', default=None, type=float, help='stochastic depth (mimco 0.1, mocov3 0)')
    # MimCo
    p.add_argument('--teacher', default=None, type=str,
                   help='frozen contrastive teacher checkpoint (MoCo v3, DINO, MAE, timm or ours)')
    p.add_argument('--teacher_model', default=None, type=str,
                   help='timm name of the teacher architecture (default: inferred from the file)')
    p.add_argument('--teacher_target', default='auto', choices=['auto', 'backbone', 'head'],
                   help="image-level target: the teacher's projector on its CLS token when the file has one "
                        '(auto), the raw CLS token (backbone), or the projector, required (head)')
    p.add_argument('--mask_type', default=None, choices=['block', 'random'],
                   help='block: BEiT block-wise (mimco default); random: uniform (mae, always)')
    p.add_argument('--mask_ratio', default=None, type=float,
                   help='fraction of patches masked (mimco 0.4, mae 0.75)')
    p.add_argument('--patch_loss', default='infonce', choices=['infonce', 'smoothl1', 'cosine'],
                   help='patch-level loss: intra-image InfoNCE, or the regression ablations')
    p.add_argument('--img_loss', default='infonce', choices=['infonce', 'cosine', 'none'],
                   help='image-level loss on the CLS token; none turns it off')
    p.add_argument('--img_loss_weight', default=1.0, type=float, help='weight of the image-level loss')
    p.add_argument('--patch_temp', default=0.1, type=float, help='temperature of the patch InfoNCE')
    p.add_argument('--img_temp', default=0.2, type=float, help='temperature of the image InfoNCE')
    p.add_argument('--head_dim', default=2048, type=int, help='hidden width of the patch and CLS heads')
    p.add_argument('--head_layers', default=2, type=int, help='linear layers in each head')
    p.add_argument('--head_norm', default='bn', choices=['bn', 'none'],
                   help='bn: heads of Linear (no bias), BatchNorm, ReLU, as MoCo v3\'s projector (SyncBatchNorm '
                        'on GPUs under torchrun); none: Linear, GELU, no norm (BEiT/iBOT style)')
    # MAE
    p.add_argument('--decoder_embed_dim', default=512, type=int, help='width of the MAE decoder')
    p.add_argument('--decoder_depth', default=8, type=int, help='transformer blocks in the MAE decoder')
    p.add_argument('--decoder_num_heads', default=16, type=int, help='attention heads in the MAE decoder')
    p.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction,
                   help='MAE target: pixels normalised per patch (MAE, Sec. 3; on by default)')
    # MoCo v3
    p.add_argument('--moco_dim', default=256, type=int, help='projector / predictor output dim')
    p.add_argument('--moco_mlp_dim', default=4096, type=int, help='projector / predictor hidden dim')
    p.add_argument('--moco_m', default=0.99, type=float, help='base momentum of the key encoder')
    p.add_argument('--moco_m_cos', default=True, action=argparse.BooleanOptionalAction,
                   help='raise the momentum to 1 by a half cosine')
    p.add_argument('--moco_t', default=0.2, type=float, help='InfoNCE temperature')
    p.add_argument('--stop_grad_conv1', default=True, action=argparse.BooleanOptionalAction,
                   help='freeze the random patch projection (MoCo v3, Sec. 5)')
    # Layer Grafted Pre-training, stage 2 (--method mocov3)
    p.add_argument('--graft_pretrained', default=None, type=str,
                   help='start the base and momentum encoders from this stage-1 backbone (an MAE '
                        'checkpoint of ours or the official format; any format util/checkpoint reads)')
    p.add_argument('--lr_layer_wise', default=None, type=str,
                   help='lr multipliers a,b,c of three equal groups of blocks (embeddings with the '
                        'first, final norm and heads with the last); default 0.1,0.1,1 with '
                        '--graft_pretrained, else one lr for all')
    p.add_argument('--graft_freeze_blocks', default=0, type=int,
                   help='freeze the first N grafted blocks and the CLS token (the official --fixTo N; 0 = none)')
    p.add_argument('--graft_l1_weight', default=0.0, type=float,
                   help='weight of an L1 pull towards the grafted weights (official ViT-L: 1e-5; 0 = off)')
    p.add_argument('--graft_l1_blocks', default=0, type=int,
                   help='the L1 pull covers the embeddings and the first N blocks (official ViT-L: 12)')
    # Optimisation
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'lars'], help='optimizer')
    p.add_argument('--opt_betas', default=None, type=float, nargs=2,
                   help='AdamW betas (mimco 0.9 0.98, mae 0.9 0.95, mocov3 0.9 0.999)')
    p.add_argument('--weight_decay', default=None, type=float,
                   help='weight decay (mimco 0.05, mae 0.05, mocov3 0.1)')
    p.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * total batch / 256)')
    p.add_argument('--blr', default=1.5e-4, type=float, help='base lr for a total batch of 256')
    p.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the cosine')
    p.add_argument('--warmup_epochs', default=None, type=int,
                   help='linear warm-up (mimco 10, mae 40, mocov3 40)')
    p.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)')
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                   help='mixed precision (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--grad_ckpt', action='store_true', help='gradient checkpointing of the blocks')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--channels_last', action='store_true',
                   help="images and the patch embedding (a ViT's one convolution) in NHWC memory "
                        'layout (ViT-S/16 on an H200: the same step time, within noise)')
    # Data
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root with train/ (default: none, use the built-in digits)')
    p.add_argument('--dataset', default='auto', choices=['auto', 'digits', 'imagefolder', 'cifar10', 'cifar100'],
                   help='auto: imagefolder with --data_path, digits without')
    p.add_argument('--download', action='store_true', help='download CIFAR into --data_path')
    p.add_argument('--crop_min', default=None, type=float, help='RandomResizedCrop min scale')
    p.add_argument('--num_workers', default=4, type=int, help='data loader workers per process')
    p.add_argument('--data_backend', default='pil', choices=decode.BACKENDS,
                   help='where image files are decoded: pil, torchvision (decode_jpeg in the workers), nvjpeg '
                        '(mimco, mae: decoded, cropped and flipped on the GPU; torchvision without CUDA)')
    # Run
    p.add_argument('--output_dir', default='./output_dir', help='checkpoints and log.txt go here')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    p.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    p.add_argument('--print_freq', default=20, type=int, help='log every N steps')
    p.add_argument('--log_images_freq', default=0, type=int,
                   help='every N epochs, CLS attention maps and MAE reconstructions / MimCo masks to '
                        'TensorBoard (0 = off)')
    p.add_argument('--resume', default='', help='checkpoint to resume (default: output_dir/checkpoint-last.pth)')
    p.add_argument('--start_epoch', default=0, type=int, help='first epoch (set by --resume)')
    p.add_argument('--seed', default=0, type=int, help='random seed')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cuda or cpu (default: cuda when available)')
    p.add_argument('--dist_url', default='env://', help='url of the torch.distributed rendezvous')
    return p


def resolve_defaults(args) -> None:
    for name, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.input_size is None:
        args.input_size = timm.get_pretrained_cfg(args.model).input_size[-1]
    if args.amp is None:
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    if getattr(args, 'mask_ratio', None) is not None:
        check_mask_ratio(args.mask_ratio)
    if args.accum_iter < 1:
        raise InputError(f'--accum_iter must be at least 1, got {args.accum_iter}')
    args.log_dir = args.log_dir or args.output_dir
    args.opt_betas = list(args.opt_betas)
    check_mae_and_graft_args(args)
    warn_accumulated_contrast(args)


def warn_accumulated_contrast(args) -> None:
    """--accum_iter adds up gradients; a contrastive loss's negatives (and BatchNorm) are not added up."""
    seen = {'mocov3': "MoCo v3's InfoNCE negatives and its projector's BatchNorm",
            'mimco': "MimCo's image-level InfoNCE negatives" if args.img_loss == 'infonce' else None}.get(args.method)
    if args.accum_iter == 1 or not seen:
        return
    momentum = (f', and the momentum encoder moves at every micro-batch ({args.accum_iter} times per '
                f'optimizer step)' if args.method == 'mocov3' else '')
    print(f'warning: --accum_iter {args.accum_iter} adds up gradients, not negatives: {seen} see one '
          f'micro-batch ({args.batch_size} images per process), not the total batch of '
          f'{args.batch_size * args.accum_iter * get_world_size()}{momentum}; for the paper\'s setting raise '
          f'--batch_size instead (--grad_ckpt saves memory)')


def check_mae_and_graft_args(args) -> None:
    if args.method == 'mae' and args.mask_type != 'random':
        raise InputError(f'--method mae masks uniformly at random (MAE, Sec. 3): drop --mask_type '
                         f'{args.mask_type}')
    if args.method == 'mae' and args.decoder_embed_dim % args.decoder_num_heads:
        raise InputError(f'--decoder_embed_dim {args.decoder_embed_dim} is not divisible by '
                         f'--decoder_num_heads {args.decoder_num_heads}: pick e.g. 512 and 16, or 64 and 4')
    grafting = [f for f in ('graft_pretrained', 'lr_layer_wise', 'graft_freeze_blocks', 'graft_l1_weight')
                if getattr(args, f)]
    if grafting and args.method != 'mocov3':
        raise InputError(f'--{grafting[0]} is for Layer Grafted stage 2: use it with --method mocov3')
    if not args.graft_pretrained and (args.graft_freeze_blocks or args.graft_l1_weight):
        raise InputError('--graft_freeze_blocks and --graft_l1_weight act on grafted weights: add '
                         '--graft_pretrained (an MAE checkpoint)')
    if args.graft_pretrained and args.lr_layer_wise is None:
        args.lr_layer_wise = '0.1,0.1,1'  # the paper's ViT-B setting
    if args.lr_layer_wise is not None:
        parse_lr_layer_wise(args.lr_layer_wise)


def create_vit(args, **kwargs):
    try:
        vit = timm.create_model(args.model, num_classes=0, img_size=args.input_size,
                                drop_path_rate=args.drop_path, **kwargs)
    except RuntimeError as e:
        raise InputError(f'--model {args.model}: {e}') from None
    patch = vit.patch_embed.patch_size[0]
    if args.input_size % patch:
        raise InputError(f'--input_size {args.input_size} is not a multiple of the patch size {patch} '
                         f'of --model {args.model}: use e.g. {args.input_size // patch * patch}')
    return vit


def build_teacher(args, student) -> models_mimco.Teacher:
    """Load the teacher at the resolution that gives it the student's patch grid."""
    if not args.teacher:
        raise InputError('--method mimco needs --teacher: a frozen contrastive ViT whose tokens are the '
                         'targets (a MoCo v3 or DINO checkpoint, e.g. mocov3_vits.pth). Train one here '
                         'with `python main_pretrain.py --method mocov3 --output_dir teacher` and pass '
                         '--teacher teacher/checkpoint-last.pth')
    state_dict, projector_state, info = checkpoint.read_backbone(args.teacher)
    found = checkpoint.vit_kwargs(state_dict, info)
    grid = student.patch_embed.grid_size
    img_size = grid[0] * found['patch_size']
    if 'cls_token' not in state_dict or found['in_chans'] != student.patch_embed.proj.in_channels:
        raise InputError(f'the teacher {args.teacher} cannot give targets for this student: it needs a '
                         f'CLS token (the image-level target) and {student.patch_embed.proj.in_channels} '
                         f'input channels (it has {found["in_chans"]}); use a ViT teacher of RGB images')
    if grid[0] != grid[1]:
        raise InputError(f'the student\'s patch grid {tuple(grid)} is not square, so no teacher input '
                         f'size gives the teacher the same grid: use a square --input_size')
    model = (timm.create_model(args.teacher_model, num_classes=0, img_size=img_size)
             if args.teacher_model else None)
    backbone = checkpoint.load_backbone(args.teacher, model, img_size=img_size, flag='--teacher_model')
    use_projector = args.teacher_target == 'head' or (args.teacher_target == 'auto' and projector_state)
    if use_projector and not projector_state:
        raise InputError(f'--teacher_target head: {args.teacher} has no projector (base_encoder.head); '
                         f'use --teacher_target backbone')
    projector = checkpoint.load_projector(args.teacher) if use_projector else None
    teacher = models_mimco.Teacher(backbone, projector)
    print(f'teacher: {info["format"]} ViT, width {backbone.embed_dim}, depth {len(backbone.blocks)}, '
          f'patch {found["patch_size"]}, at {img_size} px (grid {tuple(grid)}); image-level target: '
          f'{"its projector on the CLS token" if projector else "its raw CLS token"} ({teacher.target_dim}-d)')
    return teacher


def build_model(args) -> tuple:
    """(model to train, frozen teacher or None)."""
    if args.method == 'mocov3':
        encoder = create_vit(args)
        models_mimco.mocov3_init(encoder, args.stop_grad_conv1)
        if args.graft_pretrained:
            graft_encoder(args, encoder)
        # The momentum encoder is a copy of the (grafted) encoder: both start from stage 1.
        model = models_mimco.MoCoV3(encoder, args.moco_dim, args.moco_mlp_dim, args.moco_t)
        if args.graft_l1_weight:  # official ViT-L runs: the embeddings and the first blocks
            pulled = [p for n, p in encoder.named_parameters() if p.requires_grad and (
                0 <= block_index(n) < args.graft_l1_blocks or EMBEDDINGS.search(n))]
            model.l1_pull = models_mimco.L1Pull(pulled, args.graft_l1_weight)
        return model, None
    if args.method == 'mae':
        model = models_mimco.MAE(create_vit(args), args.decoder_embed_dim, args.decoder_depth,
                                 args.decoder_num_heads, args.mask_ratio, args.norm_pix_loss)
        model.mask_generator = MaskNoiseGenerator(model.encoder.patch_embed.grid_size)
        return model, None
    student = create_vit(args)
    teacher = build_teacher(args, student)
    mask_generator = build_mask_generator(args.mask_type, student.patch_embed.grid_size, args.mask_ratio)
    model = models_mimco.MimCo(
        student, teacher_dim=teacher.backbone.embed_dim, target_dim=teacher.target_dim,
        num_masked=mask_generator.num_masked, head_dim=args.head_dim, head_layers=args.head_layers,
        head_norm=args.head_norm, patch_loss=args.patch_loss, img_loss=args.img_loss,
        patch_temp=args.patch_temp, img_temp=args.img_temp, img_loss_weight=args.img_loss_weight)
    model.mask_generator = mask_generator
    return model, teacher


def build_optimizer(args, model):
    no_weight_decay = getattr(model, 'no_weight_decay', set)()
    if args.lr_layer_wise:
        multipliers = parse_lr_layer_wise(args.lr_layer_wise)
        groups = graft_param_groups(model, multipliers, args.weight_decay, no_weight_decay)
        print('lr multipliers per group of blocks (Layer Grafted): '
              + ', '.join(f'group {g} x{m:g}' for g, m in enumerate(multipliers)))
    elif args.method == 'mocov3':
        # MoCo v3 decays every parameter (AdamW(model.parameters())); lars() exempts the 1-D ones, as its LARS.
        groups = [{'params': [p for p in model.parameters() if p.requires_grad], 'weight_decay': args.weight_decay}]
    else:  # MAE (no exemption list: its CLS and mask tokens are decayed) and MimCo
        groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_weight_decay)
    if args.optimizer == 'lars':
        return lars(groups, args.lr)
    fused = args.device.startswith('cuda')
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.opt_betas), fused=fused)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def main(args):
    init_distributed_mode(args)
    resolve_defaults(args)
    device = torch.device(args.device)
    seed_everything(args.seed + args.rank)
    checkpoint.prepare_output_dir(args.output_dir)
    print(json.dumps({k: v for k, v in vars(args).items()}, default=str))

    model, teacher = build_model(args)
    dataset, loader = decode.build_pretrain_loader(args, getattr(model, 'mask_generator', None), device)
    print(f'{len(dataset)} training images, {len(loader)} steps per epoch')

    if args.grad_ckpt:
        backbone = {'mimco': 'student', 'mae': 'encoder', 'mocov3': 'base_encoder'}[args.method]
        getattr(model, backbone).set_grad_checkpointing(True)
    model.to(device, memory_format=memory_format(args))
    if teacher is not None:
        teacher.to(device, memory_format=memory_format(args))
    model_without_ddp = model
    if args.distributed:
        if args.method != 'mae' and device.type == 'cuda':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN in the MLP heads
        # The graph is the same every step (static_graph; it does not mix with no_sync, which
        # --accum_iter uses), and gradients live in DDP's buckets (gradient_as_bucket_view).
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None,
            static_graph=args.accum_iter == 1, gradient_as_bucket_view=True)
        model_without_ddp = model.module
    train_model = torch.compile(model) if args.compile else model
    if teacher is not None and args.compile:
        teacher = torch.compile(teacher)

    total_batch = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * total_batch / 256
    print(f'lr {args.lr:.3g} (blr {args.blr:.3g} x total batch {total_batch} / 256)')
    optimizer = build_optimizer(args, model_without_ddp)
    lr_scheduler = cosine_lr_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum_schedule = (functools.partial(moco_momentum, base_m=args.moco_m, epochs=args.epochs,
                                           cosine=args.moco_m_cos)
                         if args.method == 'mocov3' else None)
    checkpoint.resume(args, model_without_ddp, optimizer, scaler,
                      same_run=('method', 'teacher', 'graft_pretrained', 'optimizer'))
    log_writer = tensorboard_writer(args.log_dir)

    print(f'training {args.method} for epochs {args.start_epoch}..{args.epochs - 1}')
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(train_model, loader, optimizer, lr_scheduler, scaler, device, epoch,
                                args, log_writer, teacher=teacher, momentum_schedule=momentum_schedule)
        state = checkpoint.training_state(args, epoch, model_without_ddp, optimizer, scaler)
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))
        if args.save_freq and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
            checkpoint.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
        log_json(args.output_dir, {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch})
        if log_writer is not None and args.log_images_freq and (epoch + 1) % args.log_images_freq == 0:
            figures.log_images(log_writer, model_without_ddp, args, epoch)
    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start))}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco pre-training', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
