"""The bare-timm reference of benchmarks/bench_step.py: a timm ViT doing only the arithmetic a
method needs, timed the way our step is, in the same process:
- mimco:  student ViT fwd + bwd + AdamW step on the full sequence, plus one teacher ViT fwd without
          grad;
- mae:    the encoder on the visible tokens (timm's PatchDropout) plus the decoder blocks,
          fwd + bwd + step;
- mocov3: base ViT fwd + bwd + step on both views, plus the momentum update and momentum ViT fwd.
Our heads, projectors and losses must fit in the margin between the two (bench_step's targets)."""

import contextlib
import functools
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import pretrain_setup
from benchmarks.timing import release_memory, timed
from util.misc import autocast


class Reference(nn.Module):
    """A timm ViT on the full sequence, its loss the mean of its tokens; with `mae`, on the visible
    tokens (PatchDropout keeps 1 - mask_ratio of the patches) and timm Blocks on the full sequence
    after it, as MAE's decoder."""

    def __init__(self, args, mae: bool = False):
        super().__init__()
        patch_drop_rate = 0.0
        if mae:
            patch_drop_rate = args.mask_ratio
        self.vit = pretrain_setup.create_vit(args, patch_drop_rate=patch_drop_rate)
        self.mae = mae
        if mae:
            dim = args.decoder_embed_dim
            norm = functools.partial(nn.LayerNorm, eps=1e-6)
            self.decoder_embed = nn.Linear(self.vit.embed_dim, dim)
            blocks = [
                Block(dim, args.decoder_num_heads, qkv_bias=True, norm_layer=norm)
                for _ in range(args.decoder_depth)
            ]
            self.decoder = nn.Sequential(*blocks)
            self.decoder_norm = norm(dim)
            self.decoder_pred = nn.Linear(dim, self.vit.patch_embed.patch_size[0] ** 2 * 3)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        if not self.mae:
            # Every view through the ViT in one batch, as MoCo v3's base encoder.
            x = self.vit.forward_features(torch.cat(images))
            return x.float().mean()
        x = self.vit.forward_features(images[0])  # (B, 1 + N_keep, D)
        masked = self.vit.num_prefix_tokens + self.vit.patch_embed.num_patches - x.shape[1]
        # Zeros in the mask tokens' slots: the decoder runs on the full sequence.
        x = F.pad(self.decoder_embed(x), (0, 0, 0, masked))  # (B, 1 + N, D_dec)
        x = self.decoder(x)
        return self.decoder_pred(self.decoder_norm(x)).float().square().mean()


def frozen_vit(args, method: str, student: nn.Module):
    """The ViT that `method` runs without gradients: MimCo's teacher, at the size that gives it the
    student's patch grid, or MoCo v3's momentum ViT; None for MAE and the plain ViT."""
    if method == 'mimco':
        with contextlib.redirect_stdout(io.StringIO()):  # build_teacher's log; not for the table
            teacher = pretrain_setup.build_teacher(args, student)
            return teacher.backbone.requires_grad_(False).eval()
    if method == 'mocov3':
        return pretrain_setup.create_vit(args).requires_grad_(False)
    return None


def measure_reference(
    args, device: torch.device, steps: int, warmup: int, full_vit: bool = False
) -> dict:
    """The bare-timm reference of `args.method` (with `full_vit`: the plain full-sequence ViT step):
    ms per step, peak MiB and warm-up s, as benchmarks.timing.timed gives them."""
    base = release_memory(device)
    method = args.method
    if full_vit:
        method = 'vit'
    size = args.input_size
    model = Reference(args, mae=method == 'mae')
    views = 1
    if method == 'mocov3':
        views = 2
    inputs = tuple(torch.randn(args.batch_size, 3, size, size, device=device) for _ in range(views))
    frozen = frozen_vit(args, method, model.vit)
    if frozen is not None:
        frozen.to(device)
        frozen_forward = frozen.forward_features
        if args.compile:
            frozen_forward = torch.compile(frozen_forward)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    optimizer = pretrain_setup.build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    def frozen_step():
        if method == 'mocov3':
            # The momentum update (a fixed momentum: its value costs nothing), then the key views.
            torch._foreach_lerp_(list(frozen.parameters()), params, 0.01)
            frozen_forward(torch.cat(inputs))
        elif method == 'mimco':
            teacher_input = inputs[0]
            if inputs[0].shape[-1] != frozen.patch_embed.img_size[-1]:
                teacher_input = F.interpolate(
                    inputs[0], size=frozen.patch_embed.img_size, mode='bicubic'
                )
            frozen_forward(teacher_input)

    def run_steps(n):
        for _ in range(n):
            with autocast(device, args.amp):
                with torch.no_grad():
                    frozen_step()
                loss = train_model(*inputs)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    return timed(run_steps, device, steps, warmup, base)
