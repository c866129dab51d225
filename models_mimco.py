"""MimCo (Zhou et al., 2022): a ViT student that sees masked patches as a learned mask token and
predicts, through a patch head and a CLS head, the tokens of a frozen contrastive `Teacher`."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

import losses
from models_vit import embed_tokens, encode_tokens, gather_tokens
from util.architectures import build_mlp


def build_head(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, norm: str = 'bn'
) -> nn.Module:
    """MimCo's patch and CLS heads, on tokens of any shape (..., in_dim) -> (..., out_dim).

    norm 'bn': MoCo v3's projector without its last BN, the BN statistics taken over every token of
    the batch; norm 'none': (Linear, GELU) x (n-1), Linear, the BEiT/iBOT-style head."""
    if norm == 'bn':
        return TokenMLP(*build_mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=False))
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = [
        m
        for dim_in, dim_out in zip(dims, dims[1:])
        for m in (nn.Linear(dim_in, dim_out), nn.GELU())
    ]
    return nn.Sequential(*layers[:-1])  # no GELU after the last Linear


class TokenMLP(nn.Sequential):
    """A BatchNorm1d MLP on tokens of any leading shape: (..., D) as (M, D), then restored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, -2)).unflatten(0, x.shape[:-1])


class Teacher(nn.Module):
    """A frozen contrastive ViT that sees the whole image and gives MimCo's targets: the
    image-level target (the CLS token, through the teacher's own projector when given) and its
    final-normed patch tokens (B, N, D_t). Always in eval()."""

    def __init__(self, backbone: VisionTransformer, projector: nn.Module = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.img_size = tuple(backbone.patch_embed.img_size)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def target_dim(self) -> int:
        if self.projector is None:
            return self.backbone.embed_dim
        return [m for m in self.projector if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, images: torch.Tensor) -> tuple:
        # inference_mode skips autograd's bookkeeping; the clones (outside it) make the targets
        # ordinary tensors, which the student's loss may save for its backward. Under
        # torch.compile no_grad: a compiled graph keeps no bookkeeping either, and AOTAutograd
        # (torch 2.11 CUDA, 2.14 CPU) fails on inference_mode reads in bf16.
        if torch.compiler.is_compiling():
            no_autograd = torch.no_grad()
        else:
            no_autograd = torch.inference_mode()
        with no_autograd:
            if tuple(images.shape[-2:]) != self.img_size:  # the student's patch grid
                images = F.interpolate(
                    images, size=self.img_size, mode='bicubic', align_corners=False
                )
            # (B, 1+N, D_t); fc_norm: the final norm of a global-pool fine-tuned file, else Identity
            tokens = self.backbone.fc_norm(self.backbone.forward_features(images))
            cls_token = tokens[:, 0]
            if self.projector is not None:
                cls_token = self.projector(cls_token)
        patch_tokens = tokens[:, self.backbone.num_prefix_tokens :]  # (B, N, D_t)
        return cls_token.clone(), patch_tokens.clone()


class MimCo(nn.Module):
    """MIM with a contrastive teacher (MimCo, Sec. 3): patch loss + img_loss_weight * image loss."""

    def __init__(
        self,
        student: VisionTransformer,
        teacher_dim: int,
        target_dim: int,
        num_masked: int,
        head_dim: int = 2048,
        head_layers: int = 2,
        head_norm: str = 'bn',
        patch_loss: str = 'infonce',
        img_loss: str = 'infonce',
        patch_temp: float = 0.1,
        img_temp: float = 0.2,
        img_loss_weight: float = 1.0,
    ):
        super().__init__()
        student.reset_classifier(0)
        self.student = student
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = build_head(
            head_layers, student.embed_dim, head_dim, teacher_dim, head_norm
        )
        # No CLS head without an image loss: DDP without static_graph (--accum_iter > 1) fails on a
        # parameter that no loss reaches.
        self.cls_head = None
        if img_loss != 'none':
            self.cls_head = build_head(
                head_layers, student.embed_dim, head_dim, target_dim, head_norm
            )
        self.num_masked = num_masked
        self.img_loss_weight = img_loss_weight
        self.patch_loss = patch_loss
        self.img_loss = img_loss
        self.patch_temp = patch_temp
        self.img_temp = img_temp

    def no_weight_decay(self) -> set:
        return {'mask_token'} | {f'student.{n}' for n in self.student.no_weight_decay()}

    def forward(self, images: torch.Tensor, mask: torch.Tensor, targets: tuple) -> tuple:
        teacher_cls, teacher_patches = targets  # (B, D_img), (B, N, D_t)
        x = embed_tokens(self.student, images, mask, self.mask_token)  # (B, 1 + N, D)
        tokens = encode_tokens(self.student, x)
        patches = tokens[:, self.student.num_prefix_tokens :]  # (B, N, D)
        # Positions of the masked patches, K per image; argsort keeps this free of host syncs.
        order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)
        positions = order[:, : self.num_masked]  # (B, K)
        masked = gather_tokens(patches, positions)  # (B, K, D)
        patch_pred = self.patch_head(masked).float()  # (B, K, D_t)
        loss = losses.PATCH_LOSSES[self.patch_loss](
            patch_pred, teacher_patches.float(), positions, self.patch_temp
        )
        terms = {'patch_loss': loss.detach()}
        if self.img_loss != 'none':
            cls_pred = self.cls_head(tokens[:, 0])  # (B, D_img)
            img_loss = losses.IMG_LOSSES[self.img_loss](
                cls_pred.float(), teacher_cls.float(), self.img_temp
            )
            terms['img_loss'] = img_loss.detach()
            loss = loss + self.img_loss_weight * img_loss
        return loss, terms
