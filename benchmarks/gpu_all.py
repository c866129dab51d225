"""The whole GPU benchmark in one command of under 8 minutes on one H100/H200 (bf16, batch 256, 224 px):
the data path (each decoder per CPU core, nvJPEG on the GPU, the real nvjpeg loader), then bench_step.py's
eager ViT-S/16 MimCo (teacher ViT-S/16) and MoCo v3 with their references, compiled MimCo, eager and
compiled MAE ViT-B/16, MAE ViT-L/16 against a full-sequence ViT-L step, and compiled MoCo v3 with its
compiled reference. Each row is printed once measured; each block stops at its time budget (what it
printed stays) and the next one starts, until --total_s.

python benchmarks/gpu_all.py 2>&1 | tee gpu_all.txt
python benchmarks/gpu_all.py --tiny    # every block on the CPU with a tiny ViT: a check of this script
"""
import argparse
import gc
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402
import bench_step  # noqa: E402

STEP = ['--batch_size', '256', '--steps', '20', '--warmup', '5']
COMPILED = ['--compile', '--batch_size', '256', '--steps', '20', '--warmup', '2']  # step 2: no recompile
VIT_S, VIT_B, VIT_L = (['--model', f'vit_{size}_patch16_224'] for size in ('small', 'base', 'large'))
# (seconds, title, benchmark, flags), in the order of what matters most should time run short.
BLOCKS = [
    (40, 'data: decoders, per CPU core, and nvJPEG', bench_data, ['--images', '256', '--repeats', '2']),
    (35, 'data: the nvjpeg training loader, 8 workers', bench_data,
     ['--table', 'loader', '--data_backend', 'nvjpeg', '--methods', 'mimco', '--images', '1024',
      '--num_workers', '8', '--batch_size', '256', '--batches', '30']),
    (50, 'eager ViT-S/16: MimCo, MoCo v3', bench_step, ['--methods', 'mimco,mocov3'] + VIT_S + STEP),
    (100, 'compiled MimCo ViT-S/16', bench_step, ['--methods', 'mimco', '--no_reference'] + VIT_S + COMPILED),
    (30, 'eager MAE ViT-B/16', bench_step, ['--methods', 'mae'] + VIT_B + STEP),
    (75, 'compiled MAE ViT-B/16', bench_step, ['--methods', 'mae', '--no_reference'] + VIT_B + COMPILED),
    (40, 'eager MAE ViT-L/16 and a full-sequence ViT-L step', bench_step,
     ['--methods', 'mae', '--batch_size', '128', '--steps', '10', '--warmup', '3'] + VIT_L),
    (100, 'compiled MoCo v3 ViT-S/16 and its compiled reference', bench_step,
     ['--methods', 'mocov3'] + VIT_S + COMPILED),
]
# --tiny: the same blocks on the CPU in seconds, --compile a no-op (tests/test_bench.py compiles for real).
TINY_DATA = ['--images', '8', '--image_size', '64', '48', '--input_size', '32', '--repeats', '1', '--num_workers', '0',
             '--batch_size', '4', '--batches', '1', '--model', 'vit_digits_patch4_16']
TINY_STEP = ['--model', 'vit_digits_patch4_16', '--batch_size', '8', '--steps', '1', '--warmup', '1', '--threads', '1',
             '--device', 'cpu', '--pretrain_args', '--moco_mlp_dim 64 --head_dim 64 --decoder_embed_dim 32 '
             '--decoder_depth 1 --decoder_num_heads 2']


class OutOfTime(BaseException):  # not an Exception: nothing inside a benchmark may swallow it
    pass


def on_alarm(signum, frame):
    raise OutOfTime


def run_block(module, argv: list, seconds: float) -> str:
    """Run one benchmark within `seconds`; '' or why it stopped."""
    signal.signal(signal.SIGALRM, on_alarm)
    # Again every 0.5 s after the budget: an exception raised while Python runs a __del__ is swallowed.
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 0.5)
    try:
        try:
            module.main(module.get_args_parser().parse_args(argv))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        why = ''
    except OutOfTime:
        why = f'stopped at its budget of {seconds:.0f} s'
    except Exception as e:  # one failed block must not cost the others' figures
        why = f'failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return why


def main(args) -> list:
    """[(title, seconds taken, why it stopped or '')] of each block."""
    start, results, compile_model = time.perf_counter(), [], torch.compile
    if args.tiny:
        torch.compile = lambda model, **kwargs: model
    try:
        for seconds, title, module, argv in BLOCKS:
            left = args.total_s - (time.perf_counter() - start)
            argv = argv + (TINY_DATA if module is bench_data else TINY_STEP) if args.tiny else argv
            print(f'\n## {title} ({" ".join(argv)}), budget {min(seconds, left):.0f} s', flush=True)
            block_start = time.perf_counter()
            why = run_block(module, argv, min(seconds, left)) if left > 0 else 'skipped: out of time'
            results.append((title, time.perf_counter() - block_start, why))
            print(f'-- {time.perf_counter() - block_start:.0f} s{": " + why if why else ""}', flush=True)
    finally:
        torch.compile = compile_model
    print(f'\ntotal {time.perf_counter() - start:.0f} s')
    return results


def get_args_parser():
    p = argparse.ArgumentParser('mimco GPU benchmark', add_help=False)
    p.add_argument('--total_s', default=470, type=float, help='stop starting blocks after this many seconds')
    p.add_argument('--tiny', action='store_true', help='tiny ViT, few images, on the CPU: a check of the script')
    return p


if __name__ == '__main__':
    main(argparse.ArgumentParser('mimco GPU benchmark', parents=[get_args_parser()]).parse_args())
