"""What a pre-training run is built from its flags: the per-method defaults, the model (with its
frozen teacher and mask generator) and the optimizer. main_pretrain.py trains with them; the
benchmarks and tools/visualize.py build the same models.
"""

import functools

import timm
import torch
from timm.optim import param_groups_weight_decay

import models_mae
import models_mimco
import models_mocov3
import models_mtl
from util import backbones, data
from util.dist import get_world_size
from util.errors import InputError
from util.graft import (
    EMBEDDINGS,
    block_index,
    graft_encoder,
    graft_param_groups,
    parse_lr_layer_wise,
)
from util.lars import lars
from util.lr_sched import absolute_lr, total_batch_size
from util.masking import MaskNoiseGenerator, build_mask_generator, check_mask_ratio, mae_num_keep
from util.misc import default_amp
from util.transforms import MAE_CROP_MIN

# Per-method defaults where the papers differ; a flag given on the command line always wins.
METHOD_DEFAULTS = {
    'mimco': dict(
        mask_type='block',
        mask_ratio=0.4,
        weight_decay=0.05,
        # Assumed (BEiT's and iBOT's ViT-S values), not read from the MimCo paper: docs/methods.md.
        opt_betas=(0.9, 0.98),
        warmup_epochs=10,
        crop_min=0.2,
        drop_path=0.1,
    ),
    'mocov3': dict(
        weight_decay=0.1, opt_betas=(0.9, 0.999), warmup_epochs=40, crop_min=0.08, drop_path=0.0
    ),
    'mae': dict(
        mask_type='random',
        mask_ratio=0.75,
        weight_decay=0.05,
        opt_betas=(0.9, 0.95),
        warmup_epochs=40,
        crop_min=MAE_CROP_MIN,
        drop_path=0.0,
    ),
    # MAE's masking and MoCo v3's optimisation and views (the MAE view keeps MAE's crop): the
    # Layer Grafted code, where MTL would live, is MoCo v3's (our reading, docs/methods.md).
    'mtl': dict(
        mask_type='random',
        mask_ratio=0.75,
        weight_decay=0.1,
        opt_betas=(0.9, 0.999),
        warmup_epochs=40,
        crop_min=0.08,
        drop_path=0.0,
    ),
}
BACKBONE = {
    'mimco': 'student',
    'mae': 'encoder',
    'mocov3': 'base_encoder',
    'mtl': 'base_encoder',
}  # the ViT each method trains
# The kNN monitor on digits, every 5 epochs and at the last: cost measured in docs/demo.md.
DIGITS_KNN_FREQ = 5


def resolve_args(args) -> None:
    """Every default that depends on other flags, once, at the start of main_pretrain.py: the
    method's defaults, the kNN monitor, the input size, --amp, --lr_layer_wise and the lr. Then
    the flags that contradict each other are refused."""
    set_method_defaults(args)
    if args.knn_freq is None:
        args.knn_freq = default_knn_freq(args)
    if args.input_size is None:
        args.input_size = timm.get_pretrained_cfg(args.model).input_size[-1]
    if args.amp is None:
        args.amp = default_amp(args.device)
    args.opt_betas = list(args.opt_betas)
    if args.graft_pretrained and args.lr_layer_wise is None:
        args.lr_layer_wise = '0.1,0.1,1'  # the paper's ViT-B setting
    total_batch = total_batch_size(args.batch_size, args.accum_iter, get_world_size())
    args.lr = absolute_lr(args.lr, args.blr, total_batch)
    check_args(args)


def set_method_defaults(args) -> None:
    """The defaults of --method where the papers differ; a flag given always wins."""
    for name, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def default_knn_freq(args) -> int:
    """The kNN monitor runs on digits by default (every DIGITS_KNN_FREQ epochs), else not."""
    if data.dataset_name(args) == 'digits':
        return DIGITS_KNN_FREQ
    return 0


def check_args(args) -> None:
    """Refuse flags that contradict each other or the method, each with one line that says why."""
    if getattr(args, 'mask_ratio', None) is not None:
        check_mask_ratio(args.mask_ratio)
    if args.method in ('mae', 'mtl'):
        check_mae_args(args)
    check_graft_args(args)


def check_mae_args(args) -> None:
    """MAE masks uniformly at random, and its decoder's width must split into its heads."""
    if args.mask_type != 'random':
        raise InputError(
            f'--method {args.method} masks uniformly at random (MAE, Sec. 3): '
            f'drop --mask_type {args.mask_type}'
        )
    if args.decoder_embed_dim % args.decoder_num_heads:
        raise InputError(
            f'--decoder_embed_dim {args.decoder_embed_dim} is not divisible by '
            f'--decoder_num_heads {args.decoder_num_heads}: pick e.g. 512 and 16, or 64 and 4'
        )


def check_graft_args(args) -> None:
    """The Layer Grafted flags belong to a cascade's second stage, --method mocov3 (MAE, then
    MoCo v3) or mae (the reverse cascade), and act on a --graft_pretrained file."""
    graft_flags = ('graft_pretrained', 'lr_layer_wise', 'graft_freeze_blocks', 'graft_l1_weight')
    grafting = [flag for flag in graft_flags if getattr(args, flag)]
    if grafting and args.method not in ('mocov3', 'mae'):
        raise InputError(
            f'--{grafting[0]} is for the second stage of a cascade: use it with --method mocov3 '
            '(Layer Grafted) or --method mae (the reverse cascade)'
        )
    if args.graft_l1_weight and args.method != 'mocov3':
        raise InputError(
            '--graft_l1_weight is the official ViT-L pull of MoCo v3 towards the MAE weights: use '
            'it with --method mocov3, or drop it'
        )
    acts_on_grafted = args.graft_freeze_blocks or args.graft_l1_weight
    if acts_on_grafted and not args.graft_pretrained:
        raise InputError(
            '--graft_freeze_blocks and --graft_l1_weight act on grafted weights: add '
            "--graft_pretrained (the first stage's checkpoint)"
        )
    if args.lr_layer_wise is not None:
        parse_lr_layer_wise(args.lr_layer_wise)


def batch_contrast(args) -> str:
    """What in this run compares the images of a batch (negatives, BatchNorm), or '' if nothing."""
    if args.method in ('mocov3', 'mtl'):
        return "MoCo v3's InfoNCE negatives and its projector's BatchNorm"
    if args.method != 'mimco':
        return ''
    parts = []
    if args.img_loss == 'infonce':
        parts.append("MimCo's image-level InfoNCE negatives")
    if args.head_norm == 'bn':
        parts.append("its heads' BatchNorm")
    return ' and '.join(parts)


def warn_accumulated_contrast(args) -> None:
    """--accum_iter adds up gradients; a contrastive loss's negatives (and BatchNorm) are not added
    up: say so, with the setting that is the paper's."""
    seen = batch_contrast(args)
    if args.accum_iter == 1 or not seen:
        return
    momentum = ''
    if args.method in ('mocov3', 'mtl'):
        momentum = (
            f', and the momentum encoder moves at every micro-batch ({args.accum_iter} times per '
            'optimizer step)'
        )
    total_batch = total_batch_size(args.batch_size, args.accum_iter, get_world_size())
    print(
        f'warning: --accum_iter {args.accum_iter} adds up gradients, not negatives: {seen} see one '
        f'micro-batch ({args.batch_size} images per process), not the total batch of '
        f"{total_batch}{momentum}; for the paper's setting raise --batch_size instead (--grad_ckpt "
        'saves memory)'
    )


def create_vit(args, **kwargs):
    """The random-init --model at --input_size: the student, encoder or base encoder."""
    return backbones.build_backbone(
        None, args.model, args.input_size, drop_path_rate=args.drop_path, **kwargs
    )


def build_teacher(args, student) -> models_mimco.Teacher:
    """Load the teacher at the resolution that gives it the student's patch grid."""
    if not args.teacher:
        raise InputError(
            '--method mimco needs --teacher: a frozen contrastive ViT whose tokens are the '
            'targets (a MoCo v3 or DINO checkpoint, e.g. mocov3_vits.pth). Train one here '
            'with `python main_pretrain.py --method mocov3 --output_dir teacher` and pass '
            '--teacher teacher/checkpoint-last.pth'
        )
    state_dict, projector_state, info = backbones.read_backbone(args.teacher)
    found = backbones.vit_kwargs(state_dict, info)
    grid = student.patch_embed.grid_size
    in_chans = student.patch_embed.proj.in_channels
    if 'cls_token' not in state_dict or found['in_chans'] != in_chans:
        raise InputError(
            f'the teacher {args.teacher} cannot give targets for this student: it needs a '
            f'CLS token (the image-level target) and {in_chans} input channels (it has '
            f'{found["in_chans"]}); use a ViT teacher of RGB images'
        )
    if grid[0] != grid[1]:
        raise InputError(
            f"the student's patch grid {tuple(grid)} is not square, so no teacher input "
            'size gives the teacher the same grid: use a square --input_size'
        )
    img_size = grid[0] * found['patch_size']
    backbone = backbones.build_backbone(
        args.teacher, args.teacher_model, img_size, flag='--teacher_model'
    )
    projector = None
    if teacher_uses_projector(args, projector_state):
        projector = backbones.load_projector(args.teacher)
    teacher = models_mimco.Teacher(backbone, projector)
    target = 'its raw CLS token'
    if projector is not None:
        target = 'its projector on the CLS token'
    print(
        f'teacher: {info["format"]} ViT, width {backbone.embed_dim}, '
        f'depth {len(backbone.blocks)}, patch {found["patch_size"]}, at {img_size} px '
        f'(grid {tuple(grid)}); image-level target: {target} ({teacher.target_dim}-d)'
    )
    return teacher


def teacher_uses_projector(args, projector_state) -> bool:
    """--teacher_target: head needs the teacher's projector, auto takes it when the file has one,
    backbone never does."""
    if args.teacher_target == 'backbone':
        return False
    if args.teacher_target == 'head' and not projector_state:
        raise InputError(
            f'--teacher_target head: {args.teacher} has no projector (base_encoder.head); '
            'use --teacher_target backbone'
        )
    return bool(projector_state)


def build_model(args) -> tuple:
    """(model to train, frozen teacher or None) of --method."""
    builders = {'mocov3': build_mocov3, 'mae': build_mae, 'mimco': build_mimco, 'mtl': build_mtl}
    return builders[args.method](args)


def build_mocov3(args) -> tuple:
    """MoCo v3 with its ViT initialisation; for Layer Grafted stage 2, its encoder grafted from
    --graft_pretrained, and the optional L1 pull towards the grafted weights. No teacher."""
    encoder = create_vit(args)
    models_mocov3.mocov3_init(encoder, args.stop_grad_conv1)
    if args.graft_pretrained:
        graft_encoder(args.graft_pretrained, encoder, args.graft_freeze_blocks)
    # The momentum encoder is a copy of the (grafted) encoder: both start from stage 1.
    model = models_mocov3.MoCoV3(encoder, args.moco_dim, args.moco_mlp_dim, args.moco_t)
    if args.graft_l1_weight:  # official ViT-L runs: the embeddings and the first blocks
        pulled = [
            param
            for name, param in encoder.named_parameters()
            if param.requires_grad and is_l1_pulled(name, args.graft_l1_blocks)
        ]
        model.l1_pull = models_mocov3.L1Pull(pulled, args.graft_l1_weight)
    return model, None


def is_l1_pulled(name: str, blocks: int) -> bool:
    """Whether the L1 pull covers the encoder's parameter `name`: the embeddings and the first
    `blocks` blocks."""
    return 0 <= block_index(name) < blocks or bool(EMBEDDINGS.search(name))


def build_mae(args) -> tuple:
    """MAE with its uniform mask noise generator; for the reverse cascade (Layer Grafted, Table 1:
    CL, then MIM), its encoder grafted from --graft_pretrained. No teacher."""
    model = models_mae.MAE(
        create_vit(args),
        args.decoder_embed_dim,
        args.decoder_depth,
        args.decoder_num_heads,
        args.mask_ratio,
        args.norm_pix_loss,
    )
    if args.graft_pretrained:
        graft_encoder(args.graft_pretrained, model.encoder, args.graft_freeze_blocks)
    grid_size = model.encoder.patch_embed.grid_size
    mae_num_keep(grid_size[0] * grid_size[1], args.mask_ratio)  # refuses a ratio keeping none
    model.mask_generator = MaskNoiseGenerator(grid_size)
    return model, None


def build_mtl(args) -> tuple:
    """MTL (Layer Grafted's joint baseline): MAE's decoder and MoCo v3's heads and momentum
    encoder around one encoder, which takes MoCo v3's initialisation (and --stop_grad_conv1), as
    both encoders of MoCo v3 do. No teacher."""
    mae, _ = build_mae(args)
    models_mocov3.mocov3_init(mae.encoder, args.stop_grad_conv1)
    moco = models_mocov3.MoCoV3(mae.encoder, args.moco_dim, args.moco_mlp_dim, args.moco_t)
    model = models_mtl.MTL(mae, moco, args.mtl_cl_weight)
    model.mask_generator = mae.mask_generator
    return model, None


def build_mimco(args) -> tuple:
    """MimCo with its mask generator on the student's patch grid, and its frozen teacher."""
    student = create_vit(args)
    teacher = build_teacher(args, student)
    mask_generator = build_mask_generator(
        args.mask_type, student.patch_embed.grid_size, args.mask_ratio
    )
    model = models_mimco.MimCo(
        student,
        teacher_dim=teacher.backbone.embed_dim,
        target_dim=teacher.target_dim,
        num_masked=mask_generator.num_masked,
        head_dim=args.head_dim,
        head_layers=args.head_layers,
        head_norm=args.head_norm,
        patch_loss=args.patch_loss,
        img_loss=args.img_loss,
        patch_temp=args.patch_temp,
        img_temp=args.img_temp,
        img_loss_weight=args.img_loss_weight,
    )
    model.mask_generator = mask_generator
    return model, teacher


def compile_for_training(model, teacher, args, device) -> tuple:
    """(the model the loop trains, the teacher it calls), the teacher moved to `device`, both
    compiled with --compile. The optimizer holds the uncompiled model's parameters."""
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if teacher is not None:
        teacher = teacher.to(device)
        if args.compile:
            teacher = torch.compile(teacher)
    return train_model, teacher


def build_momentum_schedule(args):
    """MoCo v3's key-encoder momentum by epoch progress (--moco_m, --moco_m_cos); else None."""
    if args.method not in ('mocov3', 'mtl'):
        return None
    return functools.partial(
        models_mocov3.moco_momentum, base_m=args.moco_m, epochs=args.epochs, cosine=args.moco_m_cos
    )


def build_optimizer(args, model):
    """AdamW (or --optimizer lars) over the model's parameter groups: per group of blocks with
    --lr_layer_wise (Layer Grafted), else with each method's weight decay exemptions."""
    no_weight_decay = getattr(model, 'no_weight_decay', set)()
    if args.lr_layer_wise:
        multipliers = parse_lr_layer_wise(args.lr_layer_wise)
        groups = graft_param_groups(model, multipliers, args.weight_decay, no_weight_decay)
        listed = ', '.join(f'group {g} x{m:g}' for g, m in enumerate(multipliers))
        print(f'lr multipliers per group of blocks (Layer Grafted): {listed}')
    elif args.method in ('mocov3', 'mtl'):
        # MoCo v3 decays every parameter (AdamW(model.parameters())); lars() exempts the 1-D
        # ones, as its LARS does.
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [{'params': trained, 'weight_decay': args.weight_decay}]
    else:  # MAE (no exemption list: its CLS and mask tokens are decayed) and MimCo
        groups = param_groups_weight_decay(
            model, args.weight_decay, no_weight_decay_list=no_weight_decay
        )
    if args.optimizer == 'lars':
        return lars(groups, args.lr)
    fused = args.device.startswith('cuda')
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.opt_betas), fused=fused)
