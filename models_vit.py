"""The ViT architectures this repository registers with timm, their fixed 2-D sin-cos position
embeddings, and MoCo v3's MLP (projector, predictor; MimCo's BN heads). It imports nothing of ours:
util/backbones.py reads files into these, and every model file builds on them."""
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

DIGITS_MODEL = 'vit_digits_patch4_16'  # the default of every script on the built-in digits


def _cfg(input_size: int) -> dict:
    return dict(url='', num_classes=0, input_size=(3, input_size, input_size), crop_pct=1.0,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv='patch_embed.proj', classifier='head')


default_cfgs = generate_default_cfgs({'vit_digits_patch4_16.untrained': _cfg(16),
                                      'mocov3_vit_small.untrained': _cfg(224)})


@register_model
def vit_digits_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for the built-in digits set: 16 px, 4x4 patches (a 4x4 grid), width 128, depth 6."""
    model_args = dict(img_size=16, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4)
    return _create_vision_transformer('vit_digits_patch4_16', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mocov3_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MoCo v3's ViT-S/16: as timm's vit_small_patch16_224 but with 12 heads (head dim 32)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4)
    return _create_vision_transformer('mocov3_vit_small', pretrained=pretrained, **dict(model_args, **kwargs))


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's projector/predictor: (Linear, BN, ReLU) x (n-1), Linear, BN without affine. The layer
    indices match the official checkpoints, so `base_encoder.head.*` loads as it is."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    layers = []
    for dim_in, dim_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(dim_in, dim_out, bias=False), nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def sincos_pos_embed(grid_size, dim: int, num_prefix_tokens: int, mae_layout: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (1, prefix + N, dim), zeros for the prefix tokens: sin and cos of
    the row, then of the column (MoCo v3), or the column first with `mae_layout` (MAE's get_2d_sincos_pos_embed)."""
    grid = build_sincos2d_pos_embed(list(grid_size), dim, interleave_sin_cos=True)  # (N, dim)
    if mae_layout:
        grid = torch.cat(grid.chunk(2, dim=1)[::-1], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), grid]).unsqueeze(0)


def set_sincos_pos_embed(vit: VisionTransformer, mae_layout: bool = False) -> None:
    """Fixed 2-D sin-cos position embeddings (MoCo v3, Sec. 4; MAE), zeros for the CLS token."""
    vit.pos_embed.data.copy_(sincos_pos_embed(vit.patch_embed.grid_size, vit.embed_dim,
                                              vit.num_prefix_tokens, mae_layout))
    vit.pos_embed.requires_grad_(False)
