"""Small pieces of a training or evaluation step: the --amp default, autocast, moving batches,
the model inside torch.compile and DDP."""

import contextlib

import torch


def default_amp(device: str) -> str:
    """--amp's default: bf16 autocast on CUDA, full precision on the CPU."""
    if device.startswith('cuda'):
        return 'bf16'
    return 'none'


def autocast(device: torch.device, amp: str):
    """torch.autocast in bf16 or fp16 (--amp), or nothing with --amp none."""
    dtypes = {'bf16': torch.bfloat16, 'fp16': torch.float16}
    if amp not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[amp])


def to_device(x, device: torch.device):
    """A tensor, or a (nested) tuple of tensors, moved to `device`."""
    if isinstance(x, (list, tuple)):
        return tuple(to_device(t, device) for t in x)
    return x.to(device, non_blocking=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DistributedDataParallel."""
    model = getattr(model, '_orig_mod', model)
    return getattr(model, 'module', model)
