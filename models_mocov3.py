"""MoCo v3 (Chen et al., 2021): base encoder + projector + predictor and a momentum encoder,
MoCo v3's ViT initialisation, and the optional `L1Pull` towards grafted weights (Layer Grafted,
Jiang et al., 2023)."""

import copy
import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import losses
from util.architectures import build_mlp
from util.pos_embed import set_sincos_pos_embed


def moco_momentum(epoch_progress: float, base_m: float, epochs: int, cosine: bool = True) -> float:
    """MoCo v3's momentum of the key encoder at `epoch_progress` (epochs, fractional): from base_m
    to 1 by a half cosine (its `adjust_moco_momentum`), or base_m throughout."""
    if not cosine:
        return base_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch_progress / epochs)) * (1.0 - base_m)


def mocov3_init(vit: VisionTransformer, stop_grad_conv1: bool) -> None:
    """MoCo v3's ViT initialisation (Sec. 4 and 5): sin-cos positions, Xavier-uniform linears
    (q, k, v each as its own matrix), a random patch projection frozen with `stop_grad_conv1` (the
    paper's fix for instability)."""
    set_sincos_pos_embed(vit)
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith('head'):
            fan_out = module.weight.shape[0] // 3 if 'qkv' in name else module.weight.shape[0]
            bound = math.sqrt(6.0 / float(fan_out + module.weight.shape[1]))
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    fan_in = 3 * proj.kernel_size[0] * proj.kernel_size[1]
    bound = math.sqrt(6.0 / float(fan_in + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    if stop_grad_conv1:
        proj.requires_grad_(False)


class MoCoV3(nn.Module):
    """Base encoder (ViT + projector as its `head`), predictor, momentum copy of the encoder."""

    def __init__(
        self,
        encoder: VisionTransformer,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
    ):
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
        momentum = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, list(self.base_encoder.parameters()), alpha=1.0 - m)

    @staticmethod
    def project_views(
        encoder: VisionTransformer, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple:
        """`encoder(view1), encoder(view2)` in one ViT pass over both views: LayerNorm and
        attention act on each image alone, so stacking the views changes only the number of
        kernels. The projector runs on each view alone, so that its BatchNorm normalises over one
        view's batch, as in the official code's separate passes (MoCo v3, Alg. 1)."""
        tokens = encoder.forward_features(torch.cat([view1, view2]))  # (2B, 1 + N, D)
        features = encoder.forward_head(tokens, pre_logits=True)  # (2B, D)
        return tuple(encoder.head(f) for f in features.chunk(2))  # 2 x (B, dim)

    def contrastive_loss(
        self, view1: torch.Tensor, view2: torch.Tensor, reduction: str = 'mean'
    ) -> torch.Tensor:
        """The symmetrised InfoNCE of the two views (MoCo v3, Alg. 1); `reduction` 'none': each
        image's term (B,), whose mean is the loss (the batch still gives the negatives and the
        projector's BatchNorm statistics)."""
        z1, z2 = self.project_views(self.base_encoder, view1, view2)
        q1 = self.predictor(z1)  # (B, dim)
        q2 = self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.project_views(self.momentum_encoder, view1, view2)
        t = self.temperature
        return losses.moco_infonce(q1, k2, t, reduction) + losses.moco_infonce(q2, k1, t, reduction)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, m: float = None) -> tuple:
        """With `m`, the momentum update first (engine_pretrain.train_one_epoch makes it before
        the forward)."""
        if m is not None:
            self.update_momentum_encoder(m)  # the queries do not read the momentum encoder
        loss = self.contrastive_loss(view1, view2)
        if self.l1_pull is None:
            return loss, {}
        pull = self.l1_pull()
        return loss + pull, {'moco_loss': loss.detach(), 'l1_pull': pull.detach()}


class L1Pull:
    """weight * sum |p - p_0| over some parameters: the official Layer Grafted code's pull of the
    lower blocks towards the stage-1 (MAE) weights in its ViT-L runs (`--l1_dist_w`). Not an
    nn.Module: the anchors must not be trained, saved in checkpoints (re-read from
    --graft_pretrained) or broadcast by DDP each step as buffers would be."""

    def __init__(self, params: list, weight: float):
        self.params = list(params)
        self.weight = weight
        self.anchors = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        if self.anchors[0].device != self.params[0].device:  # follow the model to its device once
            self.anchors = [a.to(p.device) for a, p in zip(self.anchors, self.params)]
        return self.weight * sum(
            (p.float() - a.float()).abs().sum() for p, a in zip(self.params, self.anchors)
        )
