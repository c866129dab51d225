"""Distributed set-up for torchrun (one process per GPU) that also runs as one plain process."""

import builtins
import datetime
import os

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


def init_distributed_mode(args) -> None:
    """Read torchrun's environment; nccl on CUDA, gloo on CPU. Without torchrun: one process."""
    args.distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if not args.distributed:
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return setup_for_distributed(True)
    args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = args.device.startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = 'nccl' if use_cuda else 'gloo'
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
