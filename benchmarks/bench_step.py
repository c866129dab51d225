"""Time and memory of one pre-training step of each method, next to a bare-timm reference.

Ours is the real code: the model from `util.pretrain.build_model`, the optimizer from
`build_optimizer`, the loop `engine.train_one_epoch`, fed synthetic batches already on the device (the
data loader is `bench_data.py`'s business). The reference, run in the same process, is a bare timm ViT
doing only the arithmetic the method needs:
- mimco:  student ViT fwd + bwd + AdamW step on the full sequence, plus one teacher ViT fwd without grad;
- mae:    the encoder on the visible tokens (timm's PatchDropout) plus the decoder blocks, fwd + bwd + step;
- mocov3: base ViT fwd + bwd + step on both views, plus the momentum update and momentum ViT fwd.
Heads, projectors and losses are not in the reference: they must fit in the targets' margin.

CPU (tiny digits ViT):  python benchmarks/bench_step.py
One GPU:                python benchmarks/bench_step.py --model vit_small_patch16_224 --batch_size 256
All GPU figures:        python benchmarks/gpu_all.py (under 8 minutes, each block within its time budget)
With --compile each model and reference is compiled first: the rows are printed as they are measured, with
the warm-up (compilation) time; --no_reference leaves the reference out (half the compilation).
"""
import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import io
import os
import shlex
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_pretrain  # noqa: E402
from engine import autocast, cosine_lr_scheduler, memory_format, to_device, train_one_epoch  # noqa: E402
from util import checkpoint, pretrain  # noqa: E402
from util.schedules import moco_momentum  # noqa: E402

METHODS = ('mimco', 'mae', 'mocov3')
# DESIGN.md, "Speed and memory", as issue 17 restates them: time ratio ours / reference, memory ratio,
# MAE / a full-sequence ViT step (ViT-L/16; ViT-B's floor is 0.55), teacher share of a MimCo step.
TIME_TARGET = {'mimco': 1.10, 'mae': 1.05, 'mocov3': 1.05}
MEMORY_TARGET = 1.15
MAE_VS_FULL_VIT = 0.40
TEACHER_SHARE = 0.35


def get_args_parser():
    p = argparse.ArgumentParser('mimco step benchmark', add_help=False)
    p.add_argument('--methods', default=','.join(METHODS), type=str,
                   help='comma-separated methods to measure (mimco, mae, mocov3)')
    p.add_argument('--model', default='vit_digits_patch4_16', type=str,
                   help='timm ViT of the student (CPU: the tiny digits ViT; GPU: vit_small_patch16_224, '
                        'vit_base_patch16_224)')
    p.add_argument('--teacher_model', default=None, type=str,
                   help="MimCo's teacher architecture, random-init (default: the same as --model)")
    p.add_argument('--batch_size', default=64, type=int, help='images per step')
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                   help='mixed precision (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--compile', action='store_true', help='torch.compile ours and the reference alike')
    p.add_argument('--no_reference', action='store_true', help='measure ours only (no bare-timm reference)')
    p.add_argument('--steps', default=10, type=int, help='timed steps per measurement')
    p.add_argument('--warmup', default=3, type=int, help='untimed steps before timing (compile, cuDNN, allocator)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    p.add_argument('--pretrain_args', default='', type=str,
                   help='more main_pretrain.py flags for ours and the reference, e.g. "--grad_ckpt --head_dim 1024"')
    p.add_argument('--threads', default=0, type=int,
                   help="torch CPU threads (0: torch's default; 1 is steadier on a shared machine)")
    p.add_argument('--seed', default=0, type=int, help='random seed of weights and batches')
    return p


# --------------------------------------------------------------------------- device and memory

def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (torch {torch.__version__})'
    model = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    return f'{model}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores (torch {torch.__version__})'


def _proc_status_mib(key: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def release_memory(device: torch.device) -> None:
    """Free what the last measurement left, so the next one starts from the same baseline."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    else:  # glibc keeps freed heap pages resident; hand them back so RSS tracks live tensors
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL('libc.so.6').malloc_trim(0)


class PeakMemory:
    """Peak memory of a measurement above the process's baseline, in MiB. CUDA: `max_memory_allocated`
    (tensors only). CPU: the resident set's high-water mark (VmHWM), reset through /proc/self/clear_refs;
    coarser, as it counts allocator slack too. None where Linux does not offer it."""

    def __init__(self, device: torch.device):
        self.device = device
        release_memory(device)
        self.base = self._current()

    def _current(self):
        if self.device.type == 'cuda':
            return torch.cuda.memory_allocated(self.device) / 2 ** 20
        try:
            return _proc_status_mib('VmRSS')
        except (OSError, StopIteration):
            return None

    def reset(self) -> None:
        """Start the high-water mark at the current use (model and optimizer built)."""
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        release_memory(self.device)
        with contextlib.suppress(OSError):
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # Linux >= 4.0: VmHWM := VmRSS

    def peak(self):
        if self.base is None:
            return None
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self.base
        return _proc_status_mib('VmHWM') - self.base


def elapsed(run_steps, device: torch.device, steps: int) -> float:
    """Seconds that `run_steps(steps)` takes, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda _: None
    sync(device)
    start = time.perf_counter()
    run_steps(steps)
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- ours

def pretrain_args(bench, method: str, teacher_path: str = None):
    """main_pretrain's args for `method`, resolved as main() resolves them."""
    argv = ['--method', method, '--model', bench.model, '--batch_size', str(bench.batch_size),
            '--device', bench.device, '--num_workers', '0', '--output_dir', '']
    argv += ['--input_size', str(bench.input_size)] if bench.input_size else []
    argv += ['--amp', bench.amp] if bench.amp else []
    argv += ['--compile'] if bench.compile else []
    argv += ['--teacher', teacher_path] if teacher_path else []
    argv += ['--teacher_model', bench.teacher_model or bench.model] if method == 'mimco' else []
    args = main_pretrain.get_args_parser().parse_args(argv + shlex.split(bench.pretrain_args))
    pretrain.resolve_defaults(args)
    # One process, as main() without torchrun.
    args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
    args.lr = args.lr or args.blr * args.batch_size / 256
    return args


def write_teacher(bench, folder: str) -> str:
    """A random-init MoCo v3 checkpoint of the teacher's size, in our format (no download)."""
    args = pretrain_args(argparse.Namespace(**{**vars(bench), 'model': bench.teacher_model or bench.model,
                                               'compile': False}), 'mocov3')
    model, _ = pretrain.build_model(args)
    path = os.path.join(folder, 'teacher.pth')
    checkpoint.save_checkpoint({'model': model.state_dict(), 'args': dict(vars(args))}, path)
    return path


def synthetic_batch(args, model, device: torch.device) -> tuple:
    """The (inputs, labels) one loader batch of `args.method` holds, random, on the device."""
    B, size = args.batch_size, args.input_size
    images = torch.randn(B, 3, size, size, device=device)
    second = {'mimco': lambda: torch.stack([model.mask_generator() for _ in range(B)]).to(device),  # (B, N) masks
              'mocov3': lambda: torch.randn_like(images)}.get(args.method)  # MoCo v3: the second view
    return (images, second()) if second else (images,), torch.zeros(B, dtype=torch.long, device=device)


def measure_ours(args, device: torch.device, steps: int, warmup: int) -> dict:
    """The real training loop on synthetic batches: ms per step, peak MiB, and the teacher's ms."""
    memory = PeakMemory(device)
    with contextlib.redirect_stdout(io.StringIO()):  # build_model and the loop log; not for the table
        model, teacher = pretrain.build_model(args)
    batch = synthetic_batch(args, model, device)
    if args.grad_ckpt:
        getattr(model, pretrain.BACKBONE[args.method]).set_grad_checkpointing(True)
    model.to(device, memory_format=memory_format(args))
    teacher = teacher.to(device, memory_format=memory_format(args)) if teacher is not None else None
    # As main(): compile the model and the teacher, the optimizer holds the uncompiled parameters.
    train_model = torch.compile(model) if args.compile else model
    teacher = torch.compile(teacher) if teacher is not None and args.compile else teacher
    optimizer = pretrain.build_optimizer(args, model)
    scheduler = cosine_lr_scheduler(optimizer, args, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum = (functools.partial(moco_momentum, base_m=args.moco_m, epochs=args.epochs,
                                  cosine=args.moco_m_cos) if args.method == 'mocov3' else None)

    def run_steps(n):
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(train_model, [batch] * n, optimizer, scheduler, scaler, device, 0, args,
                            teacher=teacher, momentum_schedule=momentum)

    memory.reset()
    warmup_s = elapsed(run_steps, device, warmup)  # with --compile: compilation too
    result = {'ms': elapsed(run_steps, device, steps) * 1000 / steps, 'peak': memory.peak(), 'warmup_s': warmup_s}
    if teacher is not None:  # the teacher alone, as the loop calls it
        def teacher_steps(n):
            for _ in range(n):
                with autocast(device, args.amp):
                    teacher(batch[0][0])
        teacher_steps(warmup)
        result['teacher_ms'] = elapsed(teacher_steps, device, steps) * 1000 / steps
    return result


# --------------------------------------------------------------------------- reference

class ReferenceMAE(nn.Module):
    """timm's ViT on the visible tokens (PatchDropout keeps 1 - mask_ratio of the patches) and a stack
    of timm Blocks on the full sequence: MAE's arithmetic with nothing else."""

    def __init__(self, args):
        super().__init__()
        self.encoder = pretrain.create_vit(args, patch_drop_rate=args.mask_ratio)
        D, dim = self.encoder.embed_dim, args.decoder_embed_dim
        p = self.encoder.patch_embed.patch_size[0]
        self.num_tokens = self.encoder.num_prefix_tokens + self.encoder.patch_embed.num_patches
        self.decoder_embed = nn.Linear(D, dim)
        self.decoder = nn.Sequential(*[Block(dim, args.decoder_num_heads, qkv_bias=True,
                                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                       for _ in range(args.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, p * p * 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(self.encoder.forward_features(images))  # (B, 1 + N_keep, D_dec)
        x = F.pad(x, (0, 0, 0, self.num_tokens - x.shape[1]))  # (B, 1 + N, D_dec): mask tokens' slots
        pred = self.decoder_pred(self.decoder_norm(self.decoder(x)))
        return pred.float().square().mean()


class ReferenceViT(nn.Module):
    """timm's ViT, fwd on the full sequence; the loss is a plain mean of its tokens."""

    def __init__(self, args):
        super().__init__()
        self.vit = pretrain.create_vit(args)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(torch.cat(images)).float().mean()


def frozen_vit(args, model_name: str, img_size: int) -> nn.Module:
    vit = pretrain.create_vit(argparse.Namespace(**{**vars(args), 'model': model_name,
                                                    'input_size': img_size, 'drop_path': 0.0}))
    return vit.requires_grad_(False).eval()


def measure_reference(args, device: torch.device, steps: int, warmup: int, full_vit: bool = False) -> dict:
    """The bare-timm reference of `args.method` (with `full_vit`: the plain full-sequence ViT step)."""
    memory = PeakMemory(device)
    B, size = args.batch_size, args.input_size
    model = ReferenceMAE(args) if args.method == 'mae' and not full_vit else ReferenceViT(args)
    views = (2 if args.method == 'mocov3' and not full_vit else 1)
    inputs = tuple(to_device(torch.randn(B, 3, size, size), device, args.channels_last) for _ in range(views))
    frozen = None
    if args.method == 'mimco' and not full_vit:
        # As build_teacher: the teacher runs at the size that gives it the student's patch grid.
        teacher_name, grid = args.teacher_model or args.model, model.vit.patch_embed.grid_size[0]
        frozen = frozen_vit(args, teacher_name, size)
        if frozen.patch_embed.grid_size[0] != grid:
            frozen = frozen_vit(args, teacher_name, grid * frozen.patch_embed.patch_size[0])
        frozen.to(device, memory_format=memory_format(args))
    elif args.method == 'mocov3' and not full_vit:
        frozen = copy.deepcopy(model.vit).requires_grad_(False).to(device, memory_format=memory_format(args))
    model.to(device, memory_format=memory_format(args)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_model = torch.compile(model) if args.compile else model
    frozen_forward = (torch.compile(frozen.forward_features) if args.compile else frozen.forward_features
                      ) if frozen is not None else None
    optimizer = pretrain.build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    def run_steps(n):
        for _ in range(n):
            with autocast(device, args.amp):
                if args.method == 'mocov3' and frozen is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(frozen.parameters()), params, 0.01)
                        frozen_forward(torch.cat(inputs))
                elif frozen is not None:
                    with torch.no_grad():
                        image = inputs[0]
                        if image.shape[-1] != frozen.patch_embed.img_size[-1]:
                            image = F.interpolate(image, size=frozen.patch_embed.img_size, mode='bicubic')
                        frozen_forward(image)
                loss = train_model(*inputs)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    memory.reset()
    run_steps(warmup)
    return {'ms': elapsed(run_steps, device, steps) * 1000 / steps, 'peak': memory.peak()}


# --------------------------------------------------------------------------- table

def markdown_row(cells: list) -> str:
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def markdown_table(header: list, rows: list) -> str:
    return '\n'.join([markdown_row(header), '|' + '|'.join('---' for _ in header) + '|']
                     + [markdown_row(row) for row in rows])


def verdict(ratio, target) -> str:
    return '' if ratio is None or target is None else ' ok' if ratio <= target else ' MISS'


def fmt(value, spec: str = '.1f', missing: str = 'n/a') -> str:
    return missing if value is None else format(value, spec)


def method_rows(method: str, args, ours: dict, ref: dict, full_vit: dict = None) -> list:
    B, ref = args.batch_size, ref or {'ms': None, 'peak': None}  # ref None: --no_reference
    time_ratio = ours['ms'] / ref['ms'] if ref['ms'] else None
    mem_ratio = ours['peak'] / ref['peak'] if ours['peak'] and ref['peak'] and ref['peak'] > 0 else None
    target = TIME_TARGET.get(method)
    rows = [[method, args.model, B, fmt(ours['ms']), fmt(1000 * B / ours['ms'], '.0f'), fmt(ours['peak'], '.0f'),
             fmt(ours['warmup_s']), fmt(ref['ms']), fmt(ref['peak'], '.0f'),
             fmt(time_ratio, '.2f') + verdict(time_ratio, target),
             fmt(mem_ratio, '.2f') + verdict(mem_ratio, MEMORY_TARGET),
             (f'time ≤ {target:.2f}×, ' if target else 'time —, ') + f'mem ≤ {MEMORY_TARGET:.2f}×']]
    if 'teacher_ms' in ours:
        share = ours['teacher_ms'] / ours['ms']
        rows.append([f'{method}: teacher fwd / step', args.teacher_model or args.model, B,
                     fmt(ours['teacher_ms']), fmt(1000 * B / ours['teacher_ms'], '.0f'), '', '', '', '',
                     fmt(share, '.2f') + verdict(share, TEACHER_SHARE), '',
                     f'≤ {TEACHER_SHARE:.2f} (GPU bf16)'])
    if full_vit is not None:
        ratio = ours['ms'] / full_vit['ms']
        rows.append([f'{method} / full-sequence ViT', args.model, B, fmt(full_vit['ms']),
                     fmt(1000 * B / full_vit['ms'], '.0f'), fmt(full_vit['peak'], '.0f'), '', '', '',
                     fmt(ratio, '.2f') + verdict(ratio, MAE_VS_FULL_VIT), '', f'time ≤ {MAE_VS_FULL_VIT:.2f}×'])
    return rows


HEADER = ['method', 'model', 'batch', 'step ms', 'img/s', 'peak MiB', 'warm-up s', 'reference ms',
          'reference MiB', 'time ratio', 'mem ratio', 'target']


def main(bench) -> str:
    methods = [m.strip() for m in bench.methods.split(',') if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f'error: --methods {bench.methods!r}: choose from {", ".join(METHODS)}')
    device = torch.device(bench.device)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    memory_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth (VmHWM), coarse'
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        teacher_path = write_teacher(bench, folder) if 'mimco' in methods else None
        for index, method in enumerate(methods):
            torch.manual_seed(bench.seed)
            args = pretrain_args(bench, method, teacher_path if method == 'mimco' else None)
            if index == 0:  # each row is printed once measured: a run cut short keeps what it measured
                print(f'device: {device_name(device)}; amp {args.amp}; compile {bench.compile}; '
                      f'channels_last {args.channels_last}; {bench.steps} timed steps after {bench.warmup} '
                      f'warm-up (warm-up s: ours, with compilation); peak memory: {memory_kind}\n')
                print(markdown_table(HEADER, []), flush=True)
            ours = measure_ours(args, device, bench.steps, bench.warmup)
            reference = functools.partial(measure_reference, args, device, bench.steps, bench.warmup)
            ref = None if bench.no_reference else reference()
            full = reference(full_vit=True) if method == 'mae' and not bench.no_reference else None
            for row in method_rows(method, args, ours, ref, full):
                print(markdown_row(row), flush=True)
                rows.append(row)
            release_memory(device)
    return markdown_table(HEADER, rows)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco step benchmark', parents=[get_args_parser()])
    main(parser.parse_args())
