"""Distributed set-up for torchrun or SLURM's srun (one process per GPU) that also runs as one plain
process."""

import builtins
import datetime
import os
import re
import subprocess

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on every rank but 0; `print(..., force=True)` still prints. Wraps the
    original print each time, so calling main() twice in one process does not stack wrappers."""

    def print(*args, force: bool = False, **kwargs):
        if is_master or force:
            _builtin_print(f'[{datetime.datetime.now():%H:%M:%S}]', *args, **kwargs)

    builtins.print = print


def expand_nodelist(nodelist: str) -> list:
    """SLURM's compact host list written out: 'node[01-03,07],gpu5' gives ['node01', 'node02',
    'node03', 'node07', 'gpu5']. Numbers keep the zero padding of their range. One bracket group per
    name, the simple lists of most clusters; `scontrol show hostnames` reads every form."""
    hosts = []
    for name in re.split(r',(?![^\[]*\])', nodelist):  # the commas outside brackets
        match = re.fullmatch(r'([^\[]*)\[([^\]]*)\](.*)', name)
        if match is None:
            hosts.append(name)
            continue
        for span in match.group(2).split(','):
            bounds = span.split('-')
            width = len(bounds[0])
            for number in range(int(bounds[0]), int(bounds[-1]) + 1):
                hosts.append(f'{match.group(1)}{number:0{width}d}{match.group(3)}')
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, where task 0 runs: `scontrol show hostnames` where
    SLURM's tools are installed, else expand_nodelist."""
    try:
        listed = subprocess.run(
            ['scontrol', 'show', 'hostnames', nodelist],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return expand_nodelist(nodelist)[0]
    hosts = listed.stdout.split()
    if not hosts:
        return expand_nodelist(nodelist)[0]
    return hosts[0]


def job_port(job_id: str) -> int:
    """A rendezvous port in 20000..39999 derived from a job id ('4242', or '4242_3' in an array):
    every task of the job and each of its requeued runs compute the same one, without talking."""
    digits = re.sub(r'\D', '', job_id) or '0'
    return 20000 + int(digits) % 20000


def slurm_to_torchrun(environ) -> dict:
    """torchrun's variables from those SLURM sets in each task of `srun`, as MAE's and DINO's
    init_distributed_mode read them: RANK from SLURM_PROCID, WORLD_SIZE from SLURM_NTASKS,
    LOCAL_RANK from SLURM_LOCALID; MASTER_ADDR the first host of the job step (MASTER_ADDR if set),
    MASTER_PORT from the environment or else derived from SLURM_JOB_ID."""
    nodelist = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST')
    nodelist = nodelist or environ.get('SLURM_NODELIST', 'localhost')
    port = environ.get('MASTER_PORT') or job_port(environ.get('SLURM_JOB_ID', '0'))
    return {
        'RANK': environ['SLURM_PROCID'],
        'WORLD_SIZE': environ.get('SLURM_NTASKS', '1'),
        'LOCAL_RANK': environ.get('SLURM_LOCALID', '0'),
        'MASTER_ADDR': environ.get('MASTER_ADDR') or first_host(nodelist),
        'MASTER_PORT': str(port),
    }


def init_distributed_mode(args) -> None:
    """Read torchrun's environment, or SLURM's under `srun` (translated to torchrun's first);
    nccl on CUDA, gloo on CPU. Without either: one process."""
    if 'RANK' not in os.environ and 'SLURM_PROCID' in os.environ:
        os.environ.update(slurm_to_torchrun(os.environ))
    args.distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if not args.distributed:
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return setup_for_distributed(True)
    args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = args.device.startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        # `srun --gpus-per-task 1` shows each task one GPU; torchrun shows all, so this is
        # LOCAL_RANK.
        args.gpu = args.gpu % torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = 'nccl' if use_cuda else 'gloo'
    # Once per process: --subset_draws runs a script's main once per draw.
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank
        )
    dist.barrier()
    setup_for_distributed(args.rank == 0)
    print(f'distributed: rank {args.rank} of {args.world_size}, backend {backend}', force=True)


def all_gather_objects(obj) -> list:
    """`obj` (any picklable value) from every rank, in rank order; [obj] without torchrun."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather(x: torch.Tensor, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, rank order.

    The slots of the other ranks carry no gradient; with `keep_local_grad` this rank's slot is `x`
    itself, so the gradient flows back to the local part (as in MoCo v3 / CLIP-style losses).
    """
    if not is_dist_avail_and_initialized():
        return x if keep_local_grad else x.detach()
    gathered = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    if keep_local_grad:
        gathered[get_rank()] = x
    return torch.cat(gathered, dim=0)


def wrap_ddp(model: torch.nn.Module, device: torch.device, gpu: int, **kwargs):
    """`model` in DistributedDataParallel, on this process's GPU (device_ids) or on the CPU."""
    device_ids = None
    if device.type == 'cuda':
        device_ids = [gpu]
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)
