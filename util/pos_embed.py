"""Fixed 2-D sin-cos position embeddings (MoCo v3, Sec. 4; MAE, Sec. 3), in both official
layouts, and DINO's resampling of a learned table to another grid."""

import math

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
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


def dino_resample_pos_embed(
    pos_embed: torch.Tensor, grid_size: tuple, num_prefix_tokens: int
) -> torch.Tensor:
    """DINO's interpolate_pos_encoding (dino vision_transformer.py): the square table
    (1, prefix + N, D) to (1, prefix + H * W, D) for `grid_size` (H, W), bicubic with the
    scale factors (H + 0.1) / sqrt(N) and (W + 0.1) / sqrt(N), not with size=(H, W) as MAE's
    interpolate_pos_embed; the sample points, hence the table, differ slightly. The prefix tokens
    are kept."""
    prefix = pos_embed[:, :num_prefix_tokens]
    patches = pos_embed[:, num_prefix_tokens:]  # (1, N, D)
    dim = patches.shape[-1]
    side = math.sqrt(patches.shape[1])
    grid = patches.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    # DINO's + 0.1 keeps floor(side * scale) at H and W despite rounding (dino issue #8).
    scale = ((grid_size[0] + 0.1) / side, (grid_size[1] + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode='bicubic')  # (1, D, H, W)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, H * W, D)
    return torch.cat([prefix, patches], dim=1)


def resample_pos_embed(
    pos_embed: torch.Tensor, grid_size: tuple, num_prefix_tokens: int, dino_rule: bool
) -> torch.Tensor:
    """A position table (1, prefix + N, D) on the grid `grid_size` (H, W): by DINO's own rule
    (`dino_rule`, for DINO's files), else by plain bicubic, as MAE's and DeiT's
    interpolate_pos_embed (timm's default antialiases)."""
    if dino_rule:
        return dino_resample_pos_embed(pos_embed, grid_size, num_prefix_tokens)
    return resample_abs_pos_embed(
        pos_embed, new_size=grid_size, num_prefix_tokens=num_prefix_tokens, antialias=False
    )
