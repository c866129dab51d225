"""How the benchmarks measure: the device's name for a table's heading, milliseconds per step
with the device's queued work included, and the peak memory of CUDA tensors."""

import contextlib
import gc
import os
import time

import torch


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux); 'unknown CPU' elsewhere."""
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return 'unknown CPU'


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, torch threads and cores; torch's version with both."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (torch {torch.__version__})'
    threads = f'{torch.get_num_threads()} torch threads of {os.cpu_count()} cores'
    return f'{cpu_model()}, {threads} (torch {torch.__version__})'


def release_memory(device: torch.device):
    """Free what the last measurement left; the MiB CUDA tensors still hold (None on the CPU)."""
    gc.collect()
    if device.type != 'cuda':
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device; on the CPU each op has ended when it returns."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(run_steps, device: torch.device, steps: int, warmup: int, base) -> dict:
    """ms per step of `run_steps(n)` (queued device work included) after `warmup` untimed steps
    (warmup_s: with --compile, compilation too), and the peak MiB of CUDA tensors above `base` from
    then on (None on the CPU, where `base` is None)."""
    if base is not None:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for n in (warmup, steps):
        synchronize(device)
        start = time.perf_counter()
        run_steps(n)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = None
    if base is not None:
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base
    return {'ms': seconds[1] * 1000 / steps, 'peak': peak, 'warmup_s': seconds[0]}
