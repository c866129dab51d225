"""Students, teachers and heads of each pre-training method, built on timm's VisionTransformer.

- `MimCo`: a ViT student that sees masked patches as a learned mask token and predicts, through a patch
  head and a CLS head, the tokens of a frozen contrastive `Teacher` (Zhou et al., 2022).
- `MoCoV3`: base encoder + projector + predictor, momentum encoder (Chen et al., 2021).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

import losses


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


def build_head(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MimCo's patch and CLS heads: an MLP (Linear, GELU) x (n-1), Linear, on tokens of any shape."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(dim_in, dim_out))
        if i < num_layers - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def set_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Fixed 2-D sin-cos position embeddings (MoCo v3, Sec. 4; MAE), zeros for the CLS token."""
    grid = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), vit.embed_dim,
                                    interleave_sin_cos=True)  # (N, D)
    prefix = torch.zeros(vit.num_prefix_tokens, vit.embed_dim)
    vit.pos_embed.data.copy_(torch.cat([prefix, grid]).unsqueeze(0))
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

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """k <- m * k + (1 - m) * q over the parameters: m = 1 keeps k, m = 0 copies q."""
        base = list(self.base_encoder.parameters())
        momentum = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, base, alpha=1.0 - m)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, m: float) -> tuple:
        q1 = self.predictor(self.base_encoder(view1))  # (B, dim)
        q2 = self.predictor(self.base_encoder(view2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.momentum_encoder(view1)
            k2 = self.momentum_encoder(view2)
        # Symmetrised InfoNCE (MoCo v3, Alg. 1).
        loss = (losses.moco_infonce(q1, k2, self.temperature)
                + losses.moco_infonce(q2, k1, self.temperature))
        return loss, {}


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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple:
        if tuple(images.shape[-2:]) != self.img_size:  # give the teacher the student's patch grid
            images = F.interpolate(images, size=self.img_size, mode='bicubic', align_corners=False)
        tokens = self.backbone.forward_features(images)  # (B, 1+N, D_t)
        cls_token = tokens[:, 0]
        patch_tokens = tokens[:, self.backbone.num_prefix_tokens:]  # (B, N, D_t)
        if self.projector is not None:
            cls_token = self.projector(cls_token)
        return cls_token, patch_tokens


class MimCo(nn.Module):
    """MIM with a contrastive teacher: masked patches -> mask token; heads regress teacher tokens.

    Total loss = patch loss + img_loss_weight * image loss (MimCo, Sec. 3).
    """

    def __init__(self, student: VisionTransformer, teacher_dim: int, target_dim: int,
                 num_masked: int, head_dim: int = 2048, head_layers: int = 2,
                 patch_loss: str = 'infonce', img_loss: str = 'infonce', patch_temp: float = 0.1,
                 img_temp: float = 0.2, img_loss_weight: float = 1.0):
        super().__init__()
        student.reset_classifier(0)
        self.student = student
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = build_head(head_layers, student.embed_dim, head_dim, teacher_dim)
        self.cls_head = build_head(head_layers, student.embed_dim, head_dim, target_dim)
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
