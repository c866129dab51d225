"""Students, teachers and heads of each pre-training method, built on timm's VisionTransformer.

- `MimCo`: a ViT student that sees masked patches as a learned mask token and predicts, through a patch
  head and a CLS head, the tokens of a frozen contrastive `Teacher` (Zhou et al., 2022).
- `MoCoV3`: base encoder + projector + predictor, momentum encoder (Chen et al., 2021); with an
  optional `L1Pull` towards grafted weights (Layer Grafted Pre-training, Jiang et al., 2023).
- `MAE`: an encoder on the visible 25 % of patches and a light decoder that regresses the pixels of
  the masked ones (He et al., 2022).
"""
import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer, _create_vision_transformer

import losses
from util.masking import random_masking_indices


# --------------------------------------------------------------------------- architectures

def _cfg(input_size: int, **kwargs) -> dict:
    return dict(url='', num_classes=0, input_size=(3, input_size, input_size), crop_pct=1.0,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv='patch_embed.proj',
                classifier='head', **kwargs)


default_cfgs = generate_default_cfgs({
    'vit_digits_patch4_16.untrained': _cfg(16),
    'mocov3_vit_small.untrained': _cfg(224),
})


@register_model
def vit_digits_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for the built-in digits set: 16 px, 4x4 patches (a 4x4 grid), width 128, depth 6."""
    model_args = dict(img_size=16, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4)
    return _create_vision_transformer('vit_digits_patch4_16', pretrained=pretrained,
                                      **dict(model_args, **kwargs))


@register_model
def mocov3_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MoCo v3's ViT-S/16: as timm's vit_small_patch16_224 but with 12 heads (head dim 32)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4)
    return _create_vision_transformer('mocov3_vit_small', pretrained=pretrained,
                                      **dict(model_args, **kwargs))


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's projector/predictor: (Linear, BN, ReLU) x (n-1), Linear, BN without affine.

    The layer indices match the official checkpoints, so `base_encoder.head.*` loads as it is.
    """
    layers = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def build_head(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, norm: str = 'bn') -> nn.Module:
    """MimCo's patch and CLS heads, on tokens of any shape (..., in_dim) -> (..., out_dim).

    norm 'bn': (Linear without bias, BatchNorm, ReLU) x (n-1), Linear without bias: MoCo v3's projector
    without its last BN, the BN statistics taken over every token of the batch. norm 'none': (Linear,
    GELU) x (n-1), Linear, the BEiT/iBOT-style head.
    """
    if norm == 'bn':
        return TokenMLP(*build_mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=False))
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(dim_in, dim_out))
        if i < num_layers - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class TokenMLP(nn.Sequential):
    """An MLP with BatchNorm1d applied to tokens of any leading shape: (..., D) is flattened to
    (M, D) for the MLP and restored after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, -2)).unflatten(0, x.shape[:-1])


def sincos_pos_embed(grid_size, dim: int, num_prefix_tokens: int, mae_layout: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (1, prefix + N, dim), zeros for the prefix tokens: sin and
    cos of the row, then of the column (MoCo v3's layout), or the column first with `mae_layout` (MAE's
    get_2d_sincos_pos_embed)."""
    grid = build_sincos2d_pos_embed(list(grid_size), dim, interleave_sin_cos=True)  # (N, dim)
    if mae_layout:
        grid = torch.cat(grid.chunk(2, dim=1)[::-1], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), grid]).unsqueeze(0)


def set_sincos_pos_embed(vit: VisionTransformer, mae_layout: bool = False) -> None:
    """Fixed 2-D sin-cos position embeddings (MoCo v3, Sec. 4; MAE), zeros for the CLS token."""
    vit.pos_embed.data.copy_(sincos_pos_embed(vit.patch_embed.grid_size, vit.embed_dim,
                                              vit.num_prefix_tokens, mae_layout))
    vit.pos_embed.requires_grad_(False)


def mocov3_init(vit: VisionTransformer, stop_grad_conv1: bool) -> None:
    """MoCo v3's ViT initialisation (Sec. 4 and 5): sin-cos positions, Xavier-uniform linears (q, k,
    v each as its own matrix), and a random patch projection that stays frozen with
    `stop_grad_conv1` — the paper's fix for training instability."""
    set_sincos_pos_embed(vit)
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith('head'):
            fan_out = module.weight.shape[0] // 3 if 'qkv' in name else module.weight.shape[0]
            bound = math.sqrt(6.0 / float(fan_out + module.weight.shape[1]))
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias) if module.bias is not None else None
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    if stop_grad_conv1:
        proj.requires_grad_(False)


# --------------------------------------------------------------------------- MoCo v3

class MoCoV3(nn.Module):
    """Base encoder (ViT + projector as its `head`), predictor, and a momentum copy of the encoder."""

    def __init__(self, encoder: VisionTransformer, dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.2):
        super().__init__()
        encoder.reset_classifier(0)
        encoder.head = build_mlp(3, encoder.embed_dim, mlp_dim, dim)  # projector
        self.base_encoder = encoder
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.predictor = build_mlp(2, dim, mlp_dim, dim)
        self.temperature = temperature
        self.l1_pull = None  # an L1Pull towards grafted weights (Layer Grafted), set by the caller

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """k <- m * k + (1 - m) * q over the parameters: m = 1 keeps k, m = 0 copies q."""
        base = list(self.base_encoder.parameters())
        momentum = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, base, alpha=1.0 - m)

    @staticmethod
    def project_views(encoder: VisionTransformer, view1: torch.Tensor, view2: torch.Tensor) -> tuple:
        """`encoder(view1), encoder(view2)` in one ViT pass over both views: LayerNorm and attention act
        on each image alone, so stacking the views changes only the number of kernels (half as many,
        each twice as large). The projector runs on each view alone, so that its BatchNorm normalises
        over one view's batch, as in the official code's separate passes (MoCo v3, Alg. 1)."""
        tokens = encoder.forward_features(torch.cat([view1, view2]))  # (2B, 1 + N, D)
        features = encoder.forward_head(tokens, pre_logits=True)  # (2B, D)
        return tuple(encoder.head(f) for f in features.chunk(2))  # 2 x (B, dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, m: float = None) -> tuple:
        """With `m`, the momentum update first (engine.train_one_epoch makes it before the forward)."""
        if m is not None:
            self.update_momentum_encoder(m)  # the queries do not read the momentum encoder
        q1, q2 = (self.predictor(z) for z in self.project_views(self.base_encoder, view1, view2))  # (B, dim)
        with torch.no_grad():
            k1, k2 = self.project_views(self.momentum_encoder, view1, view2)
        # Symmetrised InfoNCE (MoCo v3, Alg. 1).
        loss = (losses.moco_infonce(q1, k2, self.temperature)
                + losses.moco_infonce(q2, k1, self.temperature))
        if self.l1_pull is None:
            return loss, {}
        pull = self.l1_pull()
        return loss + pull, {'moco_loss': loss.detach(), 'l1_pull': pull.detach()}


class L1Pull:
    """weight * sum |p - p_0| over some parameters: the official Layer Grafted code's pull of the
    lower blocks towards the stage-1 (MAE) weights in its ViT-L runs (`--l1_dist_w`).

    Not an nn.Module on purpose: the anchors must not be trained, saved in checkpoints (they are
    re-read from --graft_pretrained) or broadcast by DDP each step as buffers would be.
    """

    def __init__(self, params: list, weight: float):
        self.params = list(params)
        self.anchors = [p.detach().clone() for p in self.params]
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        if self.anchors[0].device != self.params[0].device:  # follow the model to its device once
            self.anchors = [a.to(p.device) for a, p in zip(self.anchors, self.params)]
        distance = sum((p.float() - a.float()).abs().sum() for p, a in zip(self.params, self.anchors))
        return self.weight * distance


# --------------------------------------------------------------------------- MimCo

class Teacher(nn.Module):
    """A frozen contrastive ViT that sees the whole image and gives MimCo's targets.

    Returns the image-level target (the CLS token, through the teacher's own projector when it has
    one and `use_projector`) and its final-normed patch tokens (B, N, D_t). Always in eval().
    """

    def __init__(self, backbone: VisionTransformer, projector: nn.Module = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.img_size = tuple(backbone.patch_embed.img_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def target_dim(self) -> int:
        if self.projector is None:
            return self.backbone.embed_dim
        return [m for m in self.projector if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, images: torch.Tensor) -> tuple:
        # inference_mode skips autograd's bookkeeping entirely; the clones (outside it) turn the
        # targets into ordinary tensors, which the student's loss may save for its backward. Under
        # torch.compile no_grad instead: a compiled graph keeps no bookkeeping either, and AOTAutograd
        # (torch 2.11 on CUDA, 2.14 on CPU) fails on parameters read in an inference_mode region in bf16.
        no_grad = torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()
        with no_grad:
            if tuple(images.shape[-2:]) != self.img_size:  # give the teacher the student's patch grid
                images = F.interpolate(images, size=self.img_size, mode='bicubic', align_corners=False)
            # (B, 1+N, D_t); fc_norm is the final norm of a global-pool fine-tuned file, Identity elsewhere
            tokens = self.backbone.fc_norm(self.backbone.forward_features(images))
            cls_token = tokens[:, 0]
            if self.projector is not None:
                cls_token = self.projector(cls_token)
        patch_tokens = tokens[:, self.backbone.num_prefix_tokens:]  # (B, N, D_t)
        return cls_token.clone(), patch_tokens.clone()


class MimCo(nn.Module):
    """MIM with a contrastive teacher: masked patches -> mask token; heads regress teacher tokens.

    Total loss = patch loss + img_loss_weight * image loss (MimCo, Sec. 3).
    """

    def __init__(self, student: VisionTransformer, teacher_dim: int, target_dim: int,
                 num_masked: int, head_dim: int = 2048, head_layers: int = 2, head_norm: str = 'bn',
                 patch_loss: str = 'infonce', img_loss: str = 'infonce', patch_temp: float = 0.1,
                 img_temp: float = 0.2, img_loss_weight: float = 1.0):
        super().__init__()
        student.reset_classifier(0)
        self.student = student
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = build_head(head_layers, student.embed_dim, head_dim, teacher_dim, head_norm)
        # No CLS head without an image loss: DDP without static_graph (--accum_iter > 1) fails on a
        # parameter that no loss reaches.
        self.cls_head = (build_head(head_layers, student.embed_dim, head_dim, target_dim, head_norm)
                         if img_loss != 'none' else None)
        self.num_masked = num_masked
        self.patch_loss, self.img_loss = patch_loss, img_loss
        self.patch_temp, self.img_temp = patch_temp, img_temp
        self.img_loss_weight = img_loss_weight

    def no_weight_decay(self) -> set:
        return {'mask_token'} | {f'student.{n}' for n in self.student.no_weight_decay()}

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The student's final-normed tokens (B, 1+N, D) with masked patches as the mask token."""
        vit = self.student
        x = vit.patch_embed(images)  # (B, N, D)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))  # (B, 1+N, D)
        x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing else vit.blocks(x)
        return vit.norm(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, targets: tuple) -> tuple:
        teacher_cls, teacher_patches = targets  # (B, D_img), (B, N, D_t)
        tokens = self.encode(images, mask)
        patches = tokens[:, self.student.num_prefix_tokens:]  # (B, N, D)
        # Positions of the masked patches, K per image; argsort keeps this free of host syncs.
        positions = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)
        positions = positions[:, :self.num_masked]  # (B, K)
        masked = torch.gather(patches, 1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        patch_pred = self.patch_head(masked)  # (B, K, D_t)
        patch_loss = losses.PATCH_LOSSES[self.patch_loss](
            patch_pred.float(), teacher_patches.float(), positions, self.patch_temp)
        terms = {'patch_loss': patch_loss.detach()}
        loss = patch_loss
        if self.img_loss != 'none':
            cls_pred = self.cls_head(tokens[:, 0])  # (B, D_img)
            img_loss = losses.IMG_LOSSES[self.img_loss](
                cls_pred.float(), teacher_cls.float(), self.img_temp)
            terms['img_loss'] = img_loss.detach()
            loss = loss + self.img_loss_weight * img_loss
        return loss, terms


# --------------------------------------------------------------------------- MAE

class MAE(nn.Module):
    """Masked autoencoder (He et al., 2022): the encoder sees only the visible patches (Sec. 3, "MAE
    encoder"); a light decoder adds mask tokens and regresses the pixels of the masked patches.

    The decoder's names (`mask_token`, `decoder_*`) are those of the official checkpoints, so
    `util.checkpoint` tells the backbone (`encoder.*`) from the decoder in ours and theirs alike.
    """

    def __init__(self, encoder: VisionTransformer, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True):
        super().__init__()
        encoder.reset_classifier(0)
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # Fixed, not learned (Sec. 3, "MAE decoder": position embeddings on every token).
        self.register_buffer('decoder_pos_embed', sincos_pos_embed(
            encoder.patch_embed.grid_size, decoder_embed_dim, encoder.num_prefix_tokens, mae_layout=True))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation (App. A.1): Xavier-uniform linears, the patch projection as one linear
        map, normal(0.02) CLS and mask tokens, fixed sin-cos positions."""
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
        x = images.reshape(B, C, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, patches: torch.Tensor, grid: tuple) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        p, (h, w) = self.patch_size, grid
        x = patches.reshape(patches.shape[0], h, w, p, p, self.in_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], self.in_chans, h * p, w * p)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens (B, prefix + N_keep, D) of the visible patches only."""
        vit = self.encoder
        x = vit._pos_embed(vit.patch_embed(images))  # (B, P + N, D): positions added, CLS prepended
        prefix = vit.num_prefix_tokens
        visible = torch.gather(x[:, prefix:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = vit.norm_pre(torch.cat([x[:, :prefix], visible], dim=1))  # (B, P + N_keep, D)
        x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing else vit.blocks(x)
        return vit.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, N, p*p*C) of every patch from the visible tokens."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + N_keep, D_dec)
        B, N = ids_restore.shape
        masks = self.mask_token.to(x.dtype).expand(B, N + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:], masks], dim=1)  # (B, N, D_dec), visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
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

    def predict(self, images: torch.Tensor, noise: torch.Tensor = None) -> tuple:
        """(loss, prediction (B, N, p*p*C) in the target's space, mask (B, N) with 1 = masked).
        `noise` (B, N) picks the masked patches (the lowest 1 - mask_ratio are kept); drawn here
        when not given."""
        B, N = images.shape[0], self.encoder.patch_embed.num_patches
        ids_keep, ids_restore, mask = random_masking_indices(B, N, self.mask_ratio, images.device, noise)
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep), ids_restore)
        target, _ = self.target(images)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()  # masked patches only (Sec. 3, "as in BERT")
        return loss, pred, mask

    def forward(self, images: torch.Tensor, noise: torch.Tensor = None) -> tuple:
        loss, _, _ = self.predict(images, noise)
        return loss, {}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple:
        """For figures: (prediction (B, C, H, W) in the input's pixel space, mask (B, N), 1 = masked).

        With `norm_pix_loss` each predicted patch is mapped back with its true patch's mean and std.
        """
        _, pred, mask = self.predict(images)
        _, (mean, std) = self.target(images)
        return self.unpatchify(pred.float() * std + mean, self.encoder.patch_embed.grid_size), mask
