"""The ViT front end that MAE, MimCo and the attention maps share, on timm's VisionTransformer.

timm's `forward_features` runs every patch through the encoder; MAE keeps only the visible ones,
MimCo swaps the masked ones for a mask token, and the attention maps stop before the last block.
So each builds its token sequence here, from the same steps timm's forward takes. `_pos_embed`
and `checkpoint_seq` are private to timm: they are read as in timm 1.0.31, the version pinned in
requirements.txt; a timm upgrade must re-check them (tests/test_fidelity.py compares the full
sequence with timm's own `forward_features`).
"""

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens at `index` of each image: tokens (B, N, D), index (B, K) -> (B, K, D)."""
    index = index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


def embed_tokens(
    vit: VisionTransformer,
    images: torch.Tensor,
    mask: torch.Tensor = None,
    mask_token: torch.Tensor = None,
) -> torch.Tensor:
    """Patch embeddings with positions added and the CLS token prepended: (B, prefix + N, D).

    With `mask` (B, N), True = masked, the masked patches are replaced by `mask_token` (1, 1, D)
    before the positions are added (SimMIM/BEiT style, MimCo's student).
    """
    x = vit.patch_embed(images)  # (B, N, D)
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)  # (B, prefix + N, D)
    return vit.patch_drop(x)


def keep_visible(vit: VisionTransformer, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The prefix tokens and the visible patches (MAE's encoder input): (B, prefix + N_keep, D)."""
    prefix = vit.num_prefix_tokens
    visible = gather_tokens(x[:, prefix:], ids_keep)  # (B, N_keep, D)
    return torch.cat([x[:, :prefix], visible], dim=1)


def encode_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The blocks and the final norm on a token sequence (B, T, D) -> (B, T, D)."""
    x = vit.norm_pre(x)
    if vit.grad_checkpointing:
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


@torch.no_grad()
def cls_attention(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention from the CLS token to each patch, per head: (B, heads, h, w).

    timm's fused attention (SDPA) never forms the weights, so they are recomputed here from the
    last block's own qkv projection on its normed input: softmax(q k^T * scale) of the CLS query.
    """
    x = vit.norm_pre(embed_tokens(vit, images))
    x = vit.blocks[:-1](x)  # (B, 1 + N, D): the input of the last block
    last = vit.blocks[-1]
    attn = last.attn
    qkv = attn.qkv(last.norm1(x))  # (B, 1 + N, 3 D)
    qkv = qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    q = attn.q_norm(qkv[0])  # (B, heads, 1 + N, head_dim)
    k = attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1+N, 1+N)
    cls_to_patches = weights[:, :, 0, vit.num_prefix_tokens :]  # (B, heads, N)
    return cls_to_patches.unflatten(-1, vit.patch_embed.grid_size)  # (B, heads, h, w)
