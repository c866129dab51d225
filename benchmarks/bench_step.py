"""Time and memory of one pre-training step of each method, next to a bare-timm reference.

Ours is the real code (`pretrain_setup.build_model` and `build_optimizer`, `engine_pretrain.train_one_epoch`) on synthetic
batches already on the device. The reference, in the same process, is a bare timm ViT doing only the arithmetic
the method needs (heads, projectors and losses must fit in the targets' margin):
- mimco:  student ViT fwd + bwd + AdamW step on the full sequence, plus one teacher ViT fwd without grad;
- mae:    the encoder on the visible tokens (timm's PatchDropout) plus the decoder blocks, fwd + bwd + step;
- mocov3: base ViT fwd + bwd + step on both views, plus the momentum update and momentum ViT fwd.
Peak memory: CUDA's max_memory_allocated (n/a on the CPU). Warm-up s: ours, --compile's compilation included.
python -m benchmarks.bench_step                                                 # CPU, the tiny digits ViT
python -m benchmarks.bench_step --model vit_small_patch16_224 --batch_size 256  # one GPU; all: gpu_all.sh"""

import argparse
import contextlib
import functools
import gc
import io
import os
import shlex
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import main_pretrain
import pretrain_setup
from engine_pretrain import train_one_epoch
from models_mocov3 import moco_momentum
from util import checkpoint
from util.lr_sched import cosine_lr_scheduler
from util.misc import autocast

METHODS = ('mimco', 'mae', 'mocov3')
# The speed and memory goals (docs/performance.md, as issue 17 states them): time ratio ours / reference, memory ratio,
# MAE / a full-sequence ViT step (ViT-L/16; ViT-B's floor is 0.55), teacher share of a MimCo step.
TIME_TARGET = {'mimco': 1.10, 'mae': 1.05, 'mocov3': 1.05}
MEMORY_TARGET, MAE_VS_FULL_VIT, TEACHER_SHARE = 1.15, 0.40, 0.35
HEADER = [
    'method',
    'model',
    'batch',
    'step ms',
    'img/s',
    'peak MiB',
    'warm-up s',
    'reference ms',
    'reference MiB',
    'time ratio',
    'mem ratio',
    'target',
]


def method_list(text: str) -> list:
    methods = [m.strip() for m in text.split(',') if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise argparse.ArgumentTypeError(f'{text!r}: choose from {", ".join(METHODS)}')
    return methods


def get_args_parser():
    p = argparse.ArgumentParser('mimco step benchmark', add_help=False)
    p.add_argument(
        '--methods', default=','.join(METHODS), type=method_list, help='mimco, mae, mocov3'
    )
    p.add_argument(
        '--model', default='vit_digits_patch4_16', type=str, help='timm ViT of the student'
    )
    p.add_argument(
        '--teacher_model',
        default=None,
        type=str,
        help="MimCo's random-init teacher (default: --model)",
    )
    p.add_argument('--batch_size', default=64, type=int, help='images per step')
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument(
        '--amp',
        default=None,
        choices=['bf16', 'fp16', 'none'],
        help='default: bf16 on CUDA, none on CPU',
    )
    p.add_argument(
        '--compile', action='store_true', help='torch.compile ours and the reference alike'
    )
    p.add_argument(
        '--no_reference', action='store_true', help='measure ours only (no bare-timm reference)'
    )
    p.add_argument('--steps', default=10, type=int, help='timed steps per measurement')
    p.add_argument(
        '--warmup',
        default=3,
        type=int,
        help='untimed steps before timing (compile, cuDNN, allocator)',
    )
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu'
    )
    p.add_argument(
        '--pretrain_args',
        default='',
        type=str,
        help='more main_pretrain.py flags, e.g. "--head_dim 1024"',
    )
    p.add_argument('--threads', default=0, type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument('--seed', default=0, type=int, help='random seed of weights and batches')
    return p


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (torch {torch.__version__})'
    model = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        model = next(
            (line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model
        )
    return f'{model}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores (torch {torch.__version__})'


def release_memory(device: torch.device):
    """Free what the last measurement left; the MiB CUDA tensors still hold (None on the CPU)."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device) / 2**20


def timed(run_steps, device: torch.device, steps: int, warmup: int, base) -> dict:
    """ms per step of `run_steps(n)` (queued device work included) after `warmup` untimed steps (warmup_s: with
    --compile, compilation too), and the peak MiB of CUDA tensors above `base` from then on (None on the CPU)."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda _: None
    if base is not None:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for n in (warmup, steps):
        sync(device)
        start = time.perf_counter()
        run_steps(n)
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak = None if base is None else torch.cuda.max_memory_allocated(device) / 2**20 - base
    return {'ms': seconds[1] * 1000 / steps, 'peak': peak, 'warmup_s': seconds[0]}


def pretrain_args(bench, method: str, *flags: str):
    """main_pretrain's args of `method`, the benchmark's model, batch and device, and `flags`, as main() has them."""
    argv = [
        '--method',
        method,
        '--model',
        bench.model,
        '--batch_size',
        str(bench.batch_size),
        '--device',
        bench.device,
        '--output_dir',
        '',
        *flags,
    ]
    args = main_pretrain.get_args_parser().parse_args(argv)
    args.distributed = False
    pretrain_setup.resolve_args(args)
    return args


def write_teacher(bench, folder: str, flags: list) -> str:
    """A random-init MoCo v3 checkpoint of the teacher's size, in our format (no download)."""
    args = pretrain_args(bench, 'mocov3', *flags, '--model', bench.teacher_model or bench.model)
    model, _ = pretrain_setup.build_model(args)
    path = os.path.join(folder, 'teacher.pth')
    checkpoint.save_checkpoint({'model': model.state_dict(), 'args': dict(vars(args))}, path)
    return path


def measure_ours(args, device: torch.device, steps: int, warmup: int) -> dict:
    """The real training loop on synthetic batches: ms per step, peak MiB, warm-up s, and the teacher's ms."""
    base = release_memory(device)
    with contextlib.redirect_stdout(
        io.StringIO()
    ):  # build_model and the loop log; not for the table
        model, teacher = pretrain_setup.build_model(args)
    # One loader batch of the method, random, on the device: (inputs, labels).
    B, images = (
        args.batch_size,
        torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device),
    )
    second = {
        'mimco': lambda: torch.stack([model.mask_generator() for _ in range(B)]).to(
            device
        ),  # (B, N) masks
        'mocov3': lambda: torch.randn_like(images),
    }.get(args.method)  # MoCo v3: the second view
    batch = (
        (images, second()) if second else (images,),
        torch.zeros(B, dtype=torch.long, device=device),
    )
    if args.grad_ckpt:
        getattr(model, pretrain_setup.BACKBONE[args.method]).set_grad_checkpointing(True)
    # As main(): compile the model and the teacher, the optimizer holds the uncompiled parameters.
    model.to(device)
    teacher = teacher.to(device) if teacher is not None else None
    train_model = torch.compile(model) if args.compile else model
    teacher = torch.compile(teacher) if teacher is not None and args.compile else teacher
    optimizer = pretrain_setup.build_optimizer(args, model)
    scheduler = cosine_lr_scheduler(optimizer, args.epochs, args.warmup_epochs, args.min_lr, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum = (
        functools.partial(
            moco_momentum, base_m=args.moco_m, epochs=args.epochs, cosine=args.moco_m_cos
        )
        if args.method == 'mocov3'
        else None
    )

    def run_steps(n):
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(
                train_model,
                [batch] * n,
                optimizer,
                scheduler,
                scaler,
                device,
                0,
                amp=args.amp,
                accum_iter=args.accum_iter,
                clip_grad=args.clip_grad,
                print_freq=args.print_freq,
                teacher=teacher,
                momentum_schedule=momentum,
            )

    result = timed(run_steps, device, steps, warmup, base)
    if teacher is not None:  # the teacher alone, as the loop calls it

        def teacher_steps(n):
            for _ in range(n):
                with autocast(device, args.amp):
                    teacher(batch[0][0])

        result['teacher_ms'] = timed(teacher_steps, device, steps, warmup, None)['ms']
    return result


class Reference(nn.Module):
    """A timm ViT on the full sequence, its loss the mean of its tokens; with `mae`, on the visible tokens
    (PatchDropout keeps 1 - mask_ratio of the patches) and timm Blocks on the full sequence after it."""

    def __init__(self, args, mae: bool = False):
        super().__init__()
        self.vit, self.mae = (
            pretrain_setup.create_vit(args, patch_drop_rate=args.mask_ratio if mae else 0.0),
            mae,
        )
        if mae:
            dim, norm = args.decoder_embed_dim, functools.partial(nn.LayerNorm, eps=1e-6)
            self.decoder_embed = nn.Linear(self.vit.embed_dim, dim)
            self.decoder = nn.Sequential(
                *[
                    Block(dim, args.decoder_num_heads, qkv_bias=True, norm_layer=norm)
                    for _ in range(args.decoder_depth)
                ]
            )
            self.decoder_norm = norm(dim)
            self.decoder_pred = nn.Linear(dim, self.vit.patch_embed.patch_size[0] ** 2 * 3)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_features(
            images[0] if self.mae else torch.cat(images)
        )  # MAE: (B, 1 + N_keep, D)
        if not self.mae:
            return x.float().mean()
        masked = self.vit.num_prefix_tokens + self.vit.patch_embed.num_patches - x.shape[1]
        x = F.pad(
            self.decoder_embed(x), (0, 0, 0, masked)
        )  # (B, 1 + N, D_dec): the mask tokens' slots
        return self.decoder_pred(self.decoder_norm(self.decoder(x))).float().square().mean()


def measure_reference(
    args, device: torch.device, steps: int, warmup: int, full_vit: bool = False
) -> dict:
    """The bare-timm reference of `args.method` (with `full_vit`: the plain full-sequence ViT step)."""
    base = release_memory(device)
    method, size = 'vit' if full_vit else args.method, args.input_size
    model = Reference(args, mae=method == 'mae')
    views = 2 if method == 'mocov3' else 1
    inputs = tuple(torch.randn(args.batch_size, 3, size, size, device=device) for _ in range(views))
    frozen = None
    if (
        method == 'mimco'
    ):  # the teacher's timm ViT, at the size that gives it the student's patch grid
        with contextlib.redirect_stdout(io.StringIO()):
            frozen = (
                pretrain_setup.build_teacher(args, model.vit).backbone.requires_grad_(False).eval()
            )
    elif method == 'mocov3':  # the momentum ViT
        frozen = pretrain_setup.create_vit(args).requires_grad_(False)
    if frozen is not None:
        frozen.to(device)
        frozen_forward = (
            torch.compile(frozen.forward_features) if args.compile else frozen.forward_features
        )
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_model = torch.compile(model) if args.compile else model
    optimizer = pretrain_setup.build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    def run_steps(n):
        for _ in range(n):
            with autocast(device, args.amp):
                with torch.no_grad():
                    if method == 'mocov3':
                        torch._foreach_lerp_(list(frozen.parameters()), params, 0.01)
                        frozen_forward(torch.cat(inputs))
                    elif method == 'mimco':
                        resize = inputs[0].shape[-1] != frozen.patch_embed.img_size[-1]
                        frozen_forward(
                            F.interpolate(
                                inputs[0], size=frozen.patch_embed.img_size, mode='bicubic'
                            )
                            if resize
                            else inputs[0]
                        )
                loss = train_model(*inputs)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    return timed(run_steps, device, steps, warmup, base)


def markdown_row(cells: list, header: bool = False) -> str:
    """A Markdown table row; with `header`, the rule under it too."""
    row = '| ' + ' | '.join(str(c) for c in cells) + ' |'
    return row + '\n|' + '---|' * len(cells) if header else row


def fmt(value, spec: str = '.1f') -> str:
    return 'n/a' if value is None else format(value, spec)


def ratio_cell(ours, reference, target: float) -> str:
    """ours / reference, with ' ok' or ' MISS' against `target`; n/a without both."""
    ratio = ours / reference if ours and reference else None
    return fmt(ratio, '.2f') + ('' if ratio is None else ' ok' if ratio <= target else ' MISS')


def method_rows(method: str, args, ours: dict, ref: dict, full_vit: dict = None) -> list:
    """Ours against the reference (None: --no_reference), MimCo's teacher share, MAE against a full ViT step."""
    B, ref, target = args.batch_size, ref or {'ms': None, 'peak': None}, TIME_TARGET[method]

    def speed(ms):  # step ms, img/s
        return [fmt(ms), fmt(1000 * B / ms, '.0f')]

    rows = [
        [
            method,
            args.model,
            B,
            *speed(ours['ms']),
            fmt(ours['peak'], '.0f'),
            fmt(ours['warmup_s']),
            fmt(ref['ms']),
            fmt(ref['peak'], '.0f'),
            ratio_cell(ours['ms'], ref['ms'], target),
            ratio_cell(ours['peak'], ref['peak'], MEMORY_TARGET),
            f'time ≤ {target:.2f}×, mem ≤ {MEMORY_TARGET:.2f}×',
        ]
    ]
    if 'teacher_ms' in ours:
        rows.append(
            [
                f'{method}: teacher fwd / step',
                args.teacher_model or args.model,
                B,
                *speed(ours['teacher_ms']),
                '',
                '',
                '',
                '',
                ratio_cell(ours['teacher_ms'], ours['ms'], TEACHER_SHARE),
                '',
                f'≤ {TEACHER_SHARE:.2f} (GPU bf16)',
            ]
        )
    if full_vit is not None:
        rows.append(
            [
                f'{method} / full-sequence ViT',
                args.model,
                B,
                *speed(full_vit['ms']),
                fmt(full_vit['peak'], '.0f'),
                '',
                '',
                '',
                ratio_cell(ours['ms'], full_vit['ms'], MAE_VS_FULL_VIT),
                '',
                f'time ≤ {MAE_VS_FULL_VIT:.2f}×',
            ]
        )
    return rows


def main(bench) -> list:
    device, rows = torch.device(bench.device), []
    if bench.threads:
        torch.set_num_threads(bench.threads)
    # The flags of every step measured; --pretrain_args last, to win.
    flags = ['--num_workers', '0'] + (
        ['--input_size', str(bench.input_size)] if bench.input_size else []
    )
    flags += (['--amp', bench.amp] if bench.amp else []) + (['--compile'] if bench.compile else [])
    flags += shlex.split(bench.pretrain_args)
    with tempfile.TemporaryDirectory() as folder:
        teacher = write_teacher(bench, folder, flags) if 'mimco' in bench.methods else None
        for method in bench.methods:
            torch.manual_seed(bench.seed)
            mimco = ['--teacher', teacher, '--teacher_model', bench.teacher_model or bench.model]
            args = pretrain_args(bench, method, *(mimco if method == 'mimco' else []), *flags)
            if (
                not rows
            ):  # each row is printed once measured: a run cut short keeps what it measured
                print(
                    f'device: {device_name(device)}; amp {args.amp}; compile {bench.compile}; '
                    f'{bench.steps} timed steps after {bench.warmup} '
                    f'warm-up (warm-up s: ours, with compilation); peak memory: '
                    f'{"torch.cuda.max_memory_allocated" if device.type == "cuda" else "n/a on the CPU"}\n'
                )
                print(markdown_row(HEADER, header=True), flush=True)
            ours = measure_ours(args, device, bench.steps, bench.warmup)
            reference = functools.partial(
                measure_reference, args, device, bench.steps, bench.warmup
            )
            ref = None if bench.no_reference else reference()
            full = reference(full_vit=True) if method == 'mae' and not bench.no_reference else None
            for row in method_rows(method, args, ours, ref, full):
                print(markdown_row(row), flush=True)
                rows.append(row)
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('mimco step benchmark', parents=[get_args_parser()]).parse_args())
