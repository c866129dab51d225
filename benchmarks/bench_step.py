"""Time and memory of one pre-training step of each method, next to a bare-timm reference.

Ours is the real code (`pretrain_setup.build_model` and `build_optimizer`,
`engine_pretrain.train_one_epoch`) on synthetic batches already on the device. The reference
(benchmarks/reference.py), in the same process, is a bare timm ViT doing only the arithmetic the
method needs: heads, projectors and losses must fit in the targets' margin.
Peak memory: CUDA's max_memory_allocated (n/a on the CPU). Warm-up s: ours, --compile's compilation
included.
python -m benchmarks.bench_step                     # CPU, the tiny digits ViT
python -m benchmarks.bench_step --model vit_small_patch16_224 --batch_size 256  # one GPU
bash benchmarks/gpu_all.sh                          # every GPU measurement"""

import argparse
import contextlib
import io
import os
import shlex
import tempfile

import torch

import main_pretrain
import pretrain_setup
from benchmarks.reference import measure_reference
from benchmarks.timing import device_name, release_memory, timed
from engine import LoopSettings
from engine_pretrain import train_one_epoch
from util import checkpoint
from util.lr_sched import cosine_lr_scheduler
from util.misc import autocast

METHODS = ('mimco', 'mae', 'mocov3')
# The speed and memory goals (docs/performance.md, as issue 17 states them).
# Time ratio, ours / reference:
TIME_TARGET = {'mimco': 1.10, 'mae': 1.05, 'mocov3': 1.05}
# Memory ratio, ours / reference:
MEMORY_TARGET = 1.15
# MAE's step / a full-sequence ViT step (ViT-L/16; ViT-B's floor is 0.55):
MAE_VS_FULL_VIT = 0.40
# The teacher's forward, as a share of a MimCo step:
TEACHER_SHARE = 0.35
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
    """argparse type of --methods: 'mimco,mae' -> ['mimco', 'mae'], each one of METHODS."""
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


def pretrain_args(bench, method: str, *flags: str):
    """main_pretrain's args of `method`, the benchmark's model, batch and device, and `flags`, as
    main() has them once resolved."""
    argv = ['--method', method, '--model', bench.model]
    argv += ['--batch_size', str(bench.batch_size), '--device', bench.device]
    argv += ['--output_dir', '', *flags]
    args = main_pretrain.get_args_parser().parse_args(argv)
    args.distributed = False
    pretrain_setup.resolve_args(args)
    return args


def step_flags(bench) -> list:
    """The main_pretrain flags of every step measured; --pretrain_args last, to win."""
    flags = ['--num_workers', '0']
    if bench.input_size:
        flags += ['--input_size', str(bench.input_size)]
    if bench.amp:
        flags += ['--amp', bench.amp]
    if bench.compile:
        flags.append('--compile')
    flags += shlex.split(bench.pretrain_args)
    return flags


def write_teacher(bench, folder: str, flags: list) -> str:
    """A random-init MoCo v3 checkpoint of the teacher's size, in our format (no download)."""
    args = pretrain_args(bench, 'mocov3', *flags, '--model', bench.teacher_model or bench.model)
    model, _ = pretrain_setup.build_model(args)
    path = os.path.join(folder, 'teacher.pth')
    checkpoint.save_checkpoint({'model': model.state_dict(), 'args': dict(vars(args))}, path)
    return path


def synthetic_batch(args, model, device: torch.device) -> tuple:
    """One loader batch of `args.method`, random, on the device: (inputs, labels). The inputs are
    the (B, 3, H, W) images, then MimCo's (B, N) masks or MoCo v3's second view."""
    B = args.batch_size
    images = torch.randn(B, 3, args.input_size, args.input_size, device=device)
    labels = torch.zeros(B, dtype=torch.long, device=device)
    if args.method == 'mimco':
        masks = torch.stack([model.mask_generator() for _ in range(B)]).to(device)  # (B, N)
        return (images, masks), labels
    if args.method == 'mocov3':
        return (images, torch.randn_like(images)), labels
    return (images,), labels


def teacher_ms(teacher, images, args, device: torch.device, steps: int, warmup: int) -> float:
    """ms per forward of the teacher alone, as the loop calls it."""

    def teacher_steps(n):
        for _ in range(n):
            with autocast(device, args.amp):
                teacher(images)

    return timed(teacher_steps, device, steps, warmup, None)['ms']


def measure_ours(args, device: torch.device, steps: int, warmup: int) -> dict:
    """The real training loop on synthetic batches: ms per step, peak MiB, warm-up s, and the
    teacher's ms (MimCo)."""
    base = release_memory(device)
    with contextlib.redirect_stdout(io.StringIO()):  # build_model's log; not for the table
        model, teacher = pretrain_setup.build_model(args)
    batch = synthetic_batch(args, model, device)
    if args.grad_ckpt:
        getattr(model, pretrain_setup.BACKBONE[args.method]).set_grad_checkpointing(True)
    model.to(device)
    train_model, teacher = pretrain_setup.compile_for_training(model, teacher, args, device)
    optimizer = pretrain_setup.build_optimizer(args, model)
    scheduler = cosine_lr_scheduler(optimizer, args.epochs, args.warmup_epochs, args.min_lr, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    momentum = pretrain_setup.build_momentum_schedule(args)
    loop = LoopSettings.from_args(args, device, optimizer, scheduler, scaler, log_writer=None)

    def run_steps(n):
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's log; not for the table
            train_one_epoch(
                train_model, [batch] * n, loop, 0, teacher=teacher, momentum_schedule=momentum
            )

    result = timed(run_steps, device, steps, warmup, base)
    if teacher is not None:
        images = batch[0][0]
        result['teacher_ms'] = teacher_ms(teacher, images, args, device, steps, warmup)
    return result


def markdown_row(cells: list, header: bool = False) -> str:
    """A Markdown table row; with `header`, the rule under it too."""
    row = '| ' + ' | '.join(str(c) for c in cells) + ' |'
    if header:
        row += '\n|' + '---|' * len(cells)
    return row


def fmt(value, spec: str = '.1f') -> str:
    if value is None:
        return 'n/a'
    return format(value, spec)


def ratio_cell(ours, reference, target: float) -> str:
    """ours / reference, with ' ok' or ' MISS' against `target`; n/a without both."""
    if not ours or not reference:
        return 'n/a'
    ratio = ours / reference
    if ratio <= target:
        return f'{ratio:.2f} ok'
    return f'{ratio:.2f} MISS'


def speed_cells(ms: float, batch_size: int) -> list:
    """The step ms and img/s cells."""
    return [fmt(ms), fmt(1000 * batch_size / ms, '.0f')]


def method_rows(method: str, args, ours: dict, ref: dict, full_vit: dict = None) -> list:
    """Ours against the reference (None: --no_reference), MimCo's teacher share, MAE against a full
    ViT step."""
    B = args.batch_size
    if ref is None:
        ref = {'ms': None, 'peak': None}
    target = TIME_TARGET[method]
    rows = [
        [
            method,
            args.model,
            B,
            *speed_cells(ours['ms'], B),
            fmt(ours['peak'], '.0f'),
            fmt(ours['warmup_s'], '.3g'),
            fmt(ref['ms']),
            fmt(ref['peak'], '.0f'),
            ratio_cell(ours['ms'], ref['ms'], target),
            ratio_cell(ours['peak'], ref['peak'], MEMORY_TARGET),
            f'time ≤ {target:.2f}×, mem ≤ {MEMORY_TARGET:.2f}×',
        ]
    ]
    if 'teacher_ms' in ours:
        share = ratio_cell(ours['teacher_ms'], ours['ms'], TEACHER_SHARE)
        rows.append(
            [
                f'{method}: teacher fwd / step',
                args.teacher_model or args.model,
                B,
                *speed_cells(ours['teacher_ms'], B),
                '',
                '',
                '',
                '',
                share,
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
                *speed_cells(full_vit['ms'], B),
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


def print_heading(bench, args, device: torch.device) -> None:
    """What was measured and how, then the table's header."""
    memory = 'n/a on the CPU'
    if device.type == 'cuda':
        memory = 'torch.cuda.max_memory_allocated'
    print(
        f'device: {device_name(device)}; amp {args.amp}; compile {bench.compile}; '
        f'{bench.steps} timed steps after {bench.warmup} '
        f'warm-up (warm-up s: ours, with compilation); peak memory: {memory}\n'
    )
    print(markdown_row(HEADER, header=True), flush=True)


def main(bench) -> list:
    device = torch.device(bench.device)
    rows = []
    if bench.threads:
        torch.set_num_threads(bench.threads)
    flags = step_flags(bench)
    with tempfile.TemporaryDirectory() as folder:
        teacher = None
        if 'mimco' in bench.methods:
            teacher = write_teacher(bench, folder, flags)
        for method in bench.methods:
            torch.manual_seed(bench.seed)
            method_flags = []
            if method == 'mimco':
                teacher_model = bench.teacher_model or bench.model
                method_flags = ['--teacher', teacher, '--teacher_model', teacher_model]
            args = pretrain_args(bench, method, *method_flags, *flags)
            # Each row is printed once measured: a run cut short keeps what it measured.
            if not rows:
                print_heading(bench, args, device)
            ours = measure_ours(args, device, bench.steps, bench.warmup)
            ref = None
            full = None
            if not bench.no_reference:
                ref = measure_reference(args, device, bench.steps, bench.warmup)
                if method == 'mae':
                    full = measure_reference(args, device, bench.steps, bench.warmup, full_vit=True)
            for row in method_rows(method, args, ours, ref, full):
                print(markdown_row(row), flush=True)
                rows.append(row)
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('mimco step benchmark', parents=[get_args_parser()]).parse_args())
