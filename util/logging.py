"""What a run prints and logs: its header (versions, device, commit, batch, lr, data), console lines
with ETA and images/s, one JSON line per epoch in log.txt, TensorBoard, and its summary line."""

import datetime
import json
import math
import os
import platform
import subprocess
import time
from collections import defaultdict, deque

import timm
import torch
import torch.distributed as dist
import torchvision

from util import checkpoint, data
from util.dist import (
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
    is_main_process,
)
from util.errors import InputError
from util.misc import default_amp


class SmoothedValue:
    """A series: its last `window_size` values (median, last) and its global average. Tensors are
    kept as they come (no host sync) and turned into floats, all in one sync, only when read."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.window = deque(maxlen=window_size)  # the last values: median and value
        self.pending = []  # tensors not read yet
        self.total = 0.0  # sum of value * n: global_avg
        self.count = 0
        self.fmt = fmt

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            self.pending.append(value.detach().float().reshape(()))
            return
        self.window.append(float(value))
        self.total += float(value) * n
        self.count += n

    def flush(self) -> list:
        """Convert the pending tensors in one sync; returns the values added."""
        if not self.pending:
            return []
        values = torch.stack(self.pending).cpu().tolist()  # the one host sync
        self.pending.clear()
        for value in values:
            self.update(value)
        return values

    def synchronize_between_processes(self) -> None:
        """The global average over every rank (the window stays this rank's)."""
        self.flush()
        if not is_dist_avail_and_initialized():
            return
        # NCCL reduces CUDA tensors only, gloo CPU ones.
        if dist.get_backend() == 'nccl':
            device = 'cuda'
        else:
            device = 'cpu'
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        self.flush()
        if not self.window:
            return math.nan
        return sorted(self.window)[len(self.window) // 2]

    @property
    def value(self) -> float:
        self.flush()
        if not self.window:
            return math.nan
        return self.window[-1]

    @property
    def global_avg(self) -> float:
        self.flush()
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues, printed as `name: median (average)` with progress, ETA and images/s."""

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
        """Yield from `iterable`, printing progress, ETA and images/s (on every rank) every
        `print_freq` steps and at the last one; then the total time."""
        total = len(iterable)
        width = len(str(total))
        # Over the last 20 steps: seconds waiting for the loader, and of a whole step (wait too).
        data_times = deque(maxlen=20)
        step_times = deque(maxlen=20)
        start = last = time.time()
        for i, obj in enumerate(iterable):
            data_times.append(time.time() - last)
            yield obj
            step_times.append(time.time() - last)
            last = time.time()
            if i % print_freq != 0 and i != total - 1:
                continue
            seconds = sum(step_times) / len(step_times)
            data_seconds = sum(data_times) / len(data_times)
            eta = datetime.timedelta(seconds=int(seconds * (total - i - 1)))
            # str(self) reads the meters' pending tensors: the one host sync of a printed step
            parts = [f'{header} [{i:>{width}}/{total}]', f'eta: {eta}', str(self)]
            if batch_size:
                images_per_second = batch_size * get_world_size() / seconds
                parts.append(f'img/s: {images_per_second:.0f}')
            parts.append(f'time: {seconds:.4f}  data: {data_seconds:.4f}')
            if torch.cuda.is_available():
                max_memory = torch.cuda.max_memory_allocated() / 2**20
                parts.append(f'max mem: {max_memory:.0f} MB')
            print(self.delimiter.join(parts))
        elapsed = time.time() - start
        total_time = datetime.timedelta(seconds=int(elapsed))
        print(f'{header} total time: {total_time} ({elapsed / max(total, 1):.4f} s / it)')


def training_logger() -> MetricLogger:
    """The logger of a training epoch; its lr meter shows the lr of the step, not an average."""
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.2e}'))
    return logger


def epoch_stats(logger: MetricLogger, epoch: int, log_writer=None) -> dict:
    """An epoch's averages over every process, printed and written to TensorBoard (train/)."""
    logger.synchronize_between_processes()
    print(f'Averaged stats: {logger}')
    stats = logger.averages()
    if log_writer is not None:
        for name, value in stats.items():
            log_writer.add_scalar(f'train/{name}', value, epoch)
    return stats


def log_json(output_dir: str, stats: dict) -> None:
    """Append one JSON line to output_dir/log.txt (rank 0 only)."""
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


def tensorboard_writer(log_dir: str):
    """A SummaryWriter on rank 0, None elsewhere or without a log dir."""
    if log_dir and is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir)  # creates the folder


def add_run_args(p, train: bool = True) -> None:
    """The flags of a run that every main_*.py has (`train`: also --compile)."""
    p.add_argument('--num_workers', default=4, type=int, help='data loader workers per process')
    p.add_argument(
        '--output_dir', default='./output_dir', help='log.txt, checkpoints (and subset.txt) go here'
    )
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    p.add_argument('--print_freq', default=20, type=int, help='log every N steps')
    p.add_argument(
        '--resume',
        default='',
        help='checkpoint to resume (default: output_dir/checkpoint-last.pth)',
    )
    p.add_argument('--start_epoch', default=0, type=int, help='first epoch (set by --resume)')
    p.add_argument(
        '--seed', default=0, type=int, help='random seed (weights, augmentations, subsets)'
    )
    p.add_argument(
        '--amp',
        default=None,
        choices=['bf16', 'fp16', 'none'],
        help='mixed precision (default: bf16 on CUDA, none on CPU)',
    )
    if train:
        p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        help='cuda or cpu (default: cuda when available)',
    )
    p.add_argument('--dist_url', default='env://', help='url of the torch.distributed rendezvous')


def setup_run(args) -> torch.device:
    """The start of main_finetune.py and main_linprobe.py: torchrun, the --amp default, the output
    folder and the seed. Returns the device; raises InputError for --accum_iter below 1."""
    init_distributed_mode(args)  # sets args.rank (0 without torchrun)
    if args.amp is None:
        args.amp = default_amp(args.device)
    # main_linprobe.py has no --accum_iter
    if getattr(args, 'accum_iter', 1) < 1:
        raise InputError(f'--accum_iter must be at least 1, got {args.accum_iter}')
    args.log_dir = args.log_dir or args.output_dir
    checkpoint.prepare_output_dir(args.output_dir)
    # One seed per rank, so that the processes draw different dropout, drop path and Mixup.
    checkpoint.seed_everything(args.seed + args.rank)
    return torch.device(args.device)


def _git(root: str, *argv: str) -> str:
    """The output of `git argv` run in `root`; OSError or SubprocessError where git fails."""
    result = subprocess.run(
        ['git', *argv], cwd=root, capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout


def git_commit() -> str:
    """This checkout's short commit hash, with `+dirty` when tracked files changed since; None
    outside a git checkout (or without git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        top, commit = _git(root, 'rev-parse', '--show-toplevel', '--short', 'HEAD').split()
        changes = _git(root, 'status', '--porcelain', '-uno')
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if os.path.realpath(top) != os.path.realpath(root):  # a repository of a folder above, not ours
        return None
    if changes.strip():
        return commit + '+dirty'
    return commit


def _device_name(device: torch.device) -> str:
    """`2 x NVIDIA H100 80GB HBM3` on CUDA, `CPU (x86_64, 8 threads)` on the CPU."""
    if device.type == 'cuda':
        return f'{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}'
    processor = platform.processor() or platform.machine()
    return f'CPU ({processor}, {torch.get_num_threads()} threads)'


def run_header(
    args, script: str, train_images: int, val_images: int = None, total_batch: int = None
) -> dict:
    """The first console lines and the first JSON line of log.txt (key `run`) of every run:
    versions, device, commit, processes, total batch and lr (where the script trains with one), the
    data set's size; then the arguments (on the console, and in the same JSON line)."""
    device = torch.device(args.device)
    header = {
        'run': script,
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'timm': timm.__version__,
        'commit': git_commit(),
        'world_size': get_world_size(),
        'device': _device_name(device),
        'data': data.dataset_name(args),
        'train_images': train_images,
        'val_images': val_images,
    }
    run = f'{header["world_size"]} process(es)'
    if total_batch:
        header.update(total_batch=total_batch, blr=args.blr, lr=args.lr)
        run += f', total batch {total_batch}, lr {args.lr:.3g}'
        # Where the lr came from: the scaling rule (MAE, App. A) or --lr itself.
        if math.isclose(args.lr, args.blr * total_batch / 256):
            run += f' (blr {args.blr:.3g} x {total_batch} / 256)'
        else:
            run += ' (--lr)'
    versions = (
        f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}'
    )
    commit = header['commit'] or 'none (not a git checkout)'
    print(f'{script} | {versions} | {header["device"]} | commit {commit}')
    shown_val = 'no'
    if val_images is not None:
        shown_val = val_images
    print(f'{run} | {header["data"]}: {train_images} train / {shown_val} val images')
    print(json.dumps(vars(args), default=str))
    log_json(args.output_dir, {**header, 'args': vars(args)})
    return header


def summarize(args, protocol: str, backbone: str, metrics: dict) -> dict:
    """The run's one summary line, and its metrics with its arguments as a JSON line in log.txt."""
    shown = []
    for name, value in metrics.items():
        if isinstance(value, float):
            shown.append(f'{name} {value:.2f}')
        else:
            shown.append(f'{name} {value}')
    model = args.model or 'model of the file'
    print(f'{protocol} | {backbone} ({model}) | {", ".join(shown)}')
    log_json(args.output_dir, {'summary': protocol, **metrics, 'args': vars(args)})
    return metrics
