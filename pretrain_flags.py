"""The flags of main_pretrain.py, one function per argparse group: model, MimCo, MAE, MoCo v3,
Layer Grafted, MTL and optimisation (docs/flags.md lists them)."""

import argparse


def add_model_args(group) -> None:
    group.add_argument(
        '--model', default='vit_digits_patch4_16', help='timm ViT to train (e.g. mocov3_vit_small)'
    )
    group.add_argument(
        '--input_size', default=None, type=int, help="image size (default: the model's)"
    )
    group.add_argument(
        '--drop_path',
        default=None,
        type=float,
        help='stochastic depth (mimco 0.1, mocov3, mae and mtl 0)',
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
        help='BEiT blocks (mimco); uniform (mae, mtl)',
    )
    group.add_argument(
        '--mask_ratio',
        default=None,
        type=float,
        help='fraction of patches masked (mimco 0.4, mae and mtl 0.75)',
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
        help='stage-1 backbone (ours or official) the encoder starts from: an MAE for mocov3 '
        '(both encoders), a MoCo v3 for mae (the reverse cascade)',
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


def add_mtl_args(group) -> None:
    group.add_argument(
        '--mtl_cl_weight',
        default=1.0,
        type=float,
        help='loss = MAE loss + this x MoCo v3 loss (the paper gives no weight; 1 is our reading)',
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
        help='AdamW betas (mimco 0.9 0.98, mae 0.9 0.95, mocov3 and mtl 0.9 0.999)',
    )
    group.add_argument(
        '--weight_decay',
        default=None,
        type=float,
        help='weight decay (mimco, mae 0.05; mocov3, mtl 0.1)',
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
        help='linear warm-up (mimco 10, mae 40, mocov3 40, mtl 40)',
    )
    group.add_argument(
        '--clip_grad', default=None, type=float, help='clip the gradient norm (off by default)'
    )
