"""What this repository adds to timm's architectures: two registered ViTs, and MoCo v3's MLP.

Importing this module registers `vit_digits_patch4_16` (the default model on the built-in digits),
its twice as deep `vit_digits_deep_patch4_16`, and `mocov3_vit_small` with timm, so that
`timm.create_model` builds them by name.
"""

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

# The default --model of every script on the built-in digits.
DIGITS_MODEL = 'vit_digits_patch4_16'


def _cfg(input_size: int) -> dict:
    return dict(
        url='',
        num_classes=0,
        input_size=(3, input_size, input_size),
        crop_pct=1.0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv='patch_embed.proj',
        classifier='head',
    )


default_cfgs = generate_default_cfgs(
    {
        'vit_digits_patch4_16.untrained': _cfg(16),
        'vit_digits_deep_patch4_16.untrained': _cfg(16),
        'mocov3_vit_small.untrained': _cfg(224),
    }
)


@register_model
def vit_digits_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for the built-in digits: 16 px, 4x4 patches (a 4x4 grid), width 128, depth 6."""
    model_args = dict(img_size=16, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4)
    model_args.update(kwargs)
    return _create_vision_transformer('vit_digits_patch4_16', pretrained=pretrained, **model_args)


@register_model
def vit_digits_deep_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vit_digits_patch4_16 at depth 12 (ViT-B's depth): the depth control of the gradient-conflict
    study (docs/methods.md)."""
    model_args = dict(img_size=16, patch_size=4, embed_dim=128, depth=12, num_heads=4, mlp_ratio=4)
    model_args.update(kwargs)
    name = 'vit_digits_deep_patch4_16'
    return _create_vision_transformer(name, pretrained=pretrained, **model_args)


@register_model
def mocov3_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MoCo v3's ViT-S/16: timm's vit_small_patch16_224 but with 12 heads (head dim 32)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4)
    model_args.update(kwargs)
    return _create_vision_transformer('mocov3_vit_small', pretrained=pretrained, **model_args)


def build_mlp(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's projector and predictor: (Linear, BN, ReLU) x (n-1), Linear, BN without affine.

    The layer indices match the official checkpoints, so `base_encoder.head.*` loads as it is.
    """
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    layers = []
    for dim_in, dim_out in zip(dims[:-1], dims[1:], strict=True):
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        layers.append(nn.BatchNorm1d(dim_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-1], out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def default_model(name: str, path: str) -> str:
    """The model every script builds: `name` (--model) when given; else the architecture the file
    at `path` holds (None: read from the file); else, without a file, DIGITS_MODEL."""
    if name:
        return name
    if path:
        return None
    return DIGITS_MODEL
