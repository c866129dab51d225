"""MAE (He et al., 2022), the pre-training of Layer Grafted's stage 1."""

import functools

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from models_vit import embed_tokens, encode_tokens, gather_tokens, keep_visible
from util.masking import random_masking_indices
from util.pos_embed import set_sincos_pos_embed, sincos_pos_embed


class MAE(nn.Module):
    """Masked autoencoder: the encoder sees only the visible patches (Sec. 3, "MAE encoder"); a
    light decoder adds mask tokens and regresses the masked patches' pixels. The decoder's names
    (`mask_token`, `decoder_*`) are the official checkpoints', so `util.backbones` tells the
    backbone (`encoder.*`) from the decoder in both."""

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        encoder.reset_classifier(0)
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # Fixed, not learned (Sec. 3, "MAE decoder": position embeddings on every token).
        decoder_pos_embed = sincos_pos_embed(
            encoder.patch_embed.grid_size,
            decoder_embed_dim,
            encoder.num_prefix_tokens,
            mae_layout=True,
        )
        self.register_buffer('decoder_pos_embed', decoder_pos_embed)
        norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)
        blocks = [
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=norm_layer,
            )
            for _ in range(decoder_depth)
        ]
        self.decoder_blocks = nn.Sequential(*blocks)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation (App. A.1): Xavier-uniform linears, the patch projection as one
        linear map, normal(0.02) CLS and mask tokens, fixed sin-cos positions."""
        set_sincos_pos_embed(self.encoder, mae_layout=True)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.encoder.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in the patch embedding's row-major order."""
        p = self.patch_size
        B, C, H, W = images.shape
        h = H // p
        w = W // p
        x = images.reshape(B, C, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)

    def unpatchify(self, patches: torch.Tensor, grid: tuple) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        p = self.patch_size
        h, w = grid
        B = patches.shape[0]
        x = patches.reshape(B, h, w, p, p, self.in_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.in_chans, h * p, w * p)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens (B, prefix + N_keep, D) of the visible patches only."""
        x = embed_tokens(self.encoder, images)  # (B, P + N, D)
        x = keep_visible(self.encoder, x, ids_keep)  # (B, P + N_keep, D)
        return encode_tokens(self.encoder, x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, N, p*p*C) of every patch from the visible tokens."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + N_keep, D_dec)
        B, N = ids_restore.shape
        masks = self.mask_token.to(x.dtype).expand(B, N + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:], masks], dim=1)  # (B, N, D_dec), visible first
        patches = gather_tokens(patches, ids_restore)  # (B, N, D_dec), image order
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed  # image order
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, prefix:]  # (B, N, p*p*C)

    def target(self, images: torch.Tensor) -> tuple:
        """Pixels per patch (B, N, p*p*C), normalised per patch with `norm_pix_loss` (Sec. 3,
        "Reconstruction target"), and each patch's (mean, std) to undo it."""
        target = self.patchify(images.float())
        if not self.norm_pix_loss:
            return target, (0.0, 1.0)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, (mean, std)

    def patch_errors(self, images: torch.Tensor, noise: torch.Tensor = None) -> tuple:
        """(squared error per patch (B, N), prediction (B, N, p*p*C) in the target's space, mask
        (B, N) with 1 = masked). `noise` (B, N), drawn here when not given, picks the masked
        patches (the lowest 1 - mask_ratio are kept)."""
        B = images.shape[0]
        N = self.encoder.patch_embed.num_patches
        ids_keep, ids_restore, mask = random_masking_indices(
            B, N, self.mask_ratio, images.device, noise
        )
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep), ids_restore)
        target, _ = self.target(images)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
        return per_patch, pred, mask

    def predict(self, images: torch.Tensor, noise: torch.Tensor = None) -> tuple:
        """(loss, prediction (B, N, p*p*C) in the target's space, mask (B, N) with 1 = masked)."""
        per_patch, pred, mask = self.patch_errors(images, noise)
        loss = (per_patch * mask).sum() / mask.sum()  # masked patches only (Sec. 3, "as in BERT")
        return loss, pred, mask

    def image_losses(self, images: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:
        """Each image's term of the batch loss (B,): they sum to `predict`'s loss."""
        per_patch, _, mask = self.patch_errors(images, noise)
        return (per_patch * mask).sum(dim=1) / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor = None) -> tuple:
        return self.predict(images, noise)[0], {}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple:
        """For figures: (prediction (B, C, H, W) in the input's pixel space, mask (B, N),
        1 = masked). With `norm_pix_loss` each predicted patch is mapped back with its true patch's
        mean and std."""
        _, pred, mask = self.predict(images)
        _, (mean, std) = self.target(images)
        pixels = pred.float() * std + mean  # (B, N, p*p*C)
        return self.unpatchify(pixels, self.encoder.patch_embed.grid_size), mask
