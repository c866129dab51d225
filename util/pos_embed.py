"""Fixed 2-D sin-cos position embeddings (MoCo v3, Sec. 4; MAE, Sec. 3), in both official
layouts."""

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer


def sincos_pos_embed(
    grid_size, dim: int, num_prefix_tokens: int, mae_layout: bool = False
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (1, prefix + N, dim), zeros for the prefix tokens.

    Sin and cos of the row, then of the column (MoCo v3's layout), or the column first with
    `mae_layout` (MAE's get_2d_sincos_pos_embed).
    """
    grid = build_sincos2d_pos_embed(list(grid_size), dim, interleave_sin_cos=True)  # (N, dim)
    if mae_layout:
        row_half, column_half = grid.chunk(2, dim=1)
        grid = torch.cat([column_half, row_half], dim=1)
    prefix = torch.zeros(num_prefix_tokens, dim)
    return torch.cat([prefix, grid]).unsqueeze(0)


def set_sincos_pos_embed(vit: VisionTransformer, mae_layout: bool = False) -> None:
    """Fill `vit.pos_embed` with the fixed table and freeze it (zeros for the CLS token)."""
    table = sincos_pos_embed(
        vit.patch_embed.grid_size, vit.embed_dim, vit.num_prefix_tokens, mae_layout
    )
    vit.pos_embed.data.copy_(table)
    vit.pos_embed.requires_grad_(False)
