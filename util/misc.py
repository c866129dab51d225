"""Small pieces both training loops use: autocast, moving batches, gradient sync, loss checks."""

import contextlib
import math

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


def gradient_sync(model: torch.nn.Module, update: bool):
    """DDP reduces the gradients during each backward; before an update none is needed.

    With --accum_iter, the micro-batches before an update run under `no_sync`.
    """
    is_ddp = isinstance(
        getattr(model, '_orig_mod', model), torch.nn.parallel.DistributedDataParallel
    )
    if update or not is_ddp:
        return contextlib.nullcontext()
    return model.no_sync()


def check_finite(values: list, first_step: int, epoch: int, terms: dict, lr: float) -> None:
    """Stop the run on a non-finite loss, before any checkpoint of this epoch is written."""
    for offset, value in enumerate(values):
        if math.isfinite(value):
            continue
        shown = [f'{name} {term:.4g}' for name, term in terms.items()]
        shown.append(f'lr {lr:.3g}')
        raise FloatingPointError(
            f'non-finite loss {value} at epoch {epoch}, step {first_step + offset} '
            f'({", ".join(shown)}). The last checkpoint is intact: resume from it with a '
            f'lower --blr, --clip_grad, or --amp bf16/none instead of fp16'
        )


def check_losses(logger, step: int, batches: int, print_freq: int, epoch: int, terms, lr) -> None:
    """At the steps that log_every prints, before it prints, check every loss since the last one.

    The flush reads them in one host sync, which printing would otherwise do unchecked.
    """
    if step % print_freq != 0 and step != batches - 1:
        return
    values = logger.meters['loss'].flush()
    first_step = step + 1 - len(values)
    shown_terms = {name: logger.meters[name].value for name in terms}
    check_finite(values, first_step, epoch, shown_terms, lr)
