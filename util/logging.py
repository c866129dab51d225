"""Metric logging: console lines with ETA and images/s, one JSON line per epoch, TensorBoard."""
import datetime
import json
import math
import os
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from util import checkpoint
from util.dist import get_world_size, init_distributed_mode, is_dist_avail_and_initialized, is_main_process
from util.errors import InputError


class SmoothedValue:
    """A window median/average and a global average of a series.

    Tensors are kept as they come (no host sync) and turned into floats only when read.
    """

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.window = deque(maxlen=window_size)
        self.pending = []
        self.total, self.count = 0.0, 0
        self.fmt = fmt

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            self.pending.append(value.detach().float().reshape(()))
        else:
            self._add(float(value), n)

    def _add(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    def flush(self) -> list:
        """Convert the pending tensors in one sync; returns the values added."""
        if not self.pending:
            return []
        values = torch.stack(self.pending).cpu().tolist()
        self.pending.clear()
        for value in values:
            self._add(value)
        return values

    def synchronize_between_processes(self) -> None:
        self.flush()
        if not is_dist_avail_and_initialized():
            return
        backend_cuda = dist.get_backend() == 'nccl'
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device='cuda' if backend_cuda else 'cpu')
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        self.flush()
        return sorted(self.window)[len(self.window) // 2] if self.window else math.nan

    @property
    def value(self) -> float:
        self.flush()
        return self.window[-1] if self.window else math.nan

    @property
    def global_avg(self) -> float:
        self.flush()
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            if value is not None:
                self.meters[name].update(value)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable, print_freq: int, header: str = '', batch_size: int = None):
        """Yield from `iterable`, printing progress, ETA and images/s (all ranks) every print_freq."""
        start = last = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        total = len(iterable)
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - last)
            yield obj
            iter_time.update(time.time() - last)
            last = time.time()
            if i % print_freq == 0 or i == total - 1:
                seconds = sum(iter_time.window) / len(iter_time.window)
                eta = datetime.timedelta(seconds=int(seconds * (total - i - 1)))
                parts = [f'{header} [{i:>{width}}/{total}]', f'eta: {eta}', str(self)]
                if batch_size:
                    parts.append(f'img/s: {batch_size * get_world_size() / seconds:.0f}')
                parts.append(f'time: {seconds:.4f}  data: {sum(data_time.window) / len(data_time.window):.4f}')
                if torch.cuda.is_available():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB')
                print(self.delimiter.join(parts))
        elapsed = time.time() - start
        print(f'{header} total time: {datetime.timedelta(seconds=int(elapsed))} '
              f'({elapsed / max(total, 1):.4f} s / it)')


def log_json(output_dir: str, stats: dict) -> None:
    """Append one JSON line to output_dir/log.txt (rank 0 only)."""
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


def tensorboard_writer(log_dir: str):
    """A SummaryWriter on rank 0, None elsewhere or without a log dir."""
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def setup_run(args) -> torch.device:
    """torchrun, AMP default, output folder, seed: the start of main_finetune.py and main_linprobe.py."""
    init_distributed_mode(args)
    if args.amp is None:
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    if getattr(args, 'accum_iter', 1) < 1:
        raise InputError(f'--accum_iter must be at least 1, got {args.accum_iter}')
    args.log_dir = args.log_dir or args.output_dir
    checkpoint.prepare_output_dir(args.output_dir)
    checkpoint.seed_everything(args.seed + args.rank)
    print(json.dumps(vars(args), default=str))
    return torch.device(args.device)


def summarize(args, protocol: str, backbone: str, metrics: dict) -> dict:
    """The run's one summary line, and its metrics with its arguments as a JSON line in log.txt."""
    shown = ', '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items())
    print(f'{protocol} | {backbone} ({args.model or "model of the file"}) | {shown}')
    log_json(args.output_dir, {'summary': protocol, **metrics, 'args': vars(args)})
    return metrics
