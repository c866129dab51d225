"""The learning rate: MAE's scaling rule and the per-update cosine schedule with warm-up."""

import math

from timm.scheduler import CosineLRScheduler


def total_batch_size(batch_size: int, accum_iter: int, world_size: int) -> int:
    """Images per optimizer update: --batch_size per process x --accum_iter x processes."""
    return batch_size * accum_iter * world_size


def absolute_lr(lr: float, blr: float, total_batch: int) -> float:
    """--lr when given, else the linear scaling rule lr = blr x total batch / 256 (MAE, App. A)."""
    if lr is not None:
        return lr
    return blr * total_batch / 256


def updates_per_epoch(batches_per_epoch: int, accum_iter: int) -> int:
    """Optimizer updates in an epoch: the last one may add up fewer than `accum_iter` batches."""
    return math.ceil(batches_per_epoch / accum_iter)


def cosine_lr_scheduler(
    optimizer, epochs: int, warmup_epochs: int, min_lr: float, updates: int
) -> CosineLRScheduler:
    """Linear warm-up from 0, then a half cosine to `min_lr`, stepped per optimizer update.

    `updates` is the number of updates per epoch (`updates_per_epoch`); a param group's
    `lr_scale` multiplies its lr (timm's schedulers read it).
    """
    warmup = warmup_epochs * updates
    cosine_updates = max(1, epochs * updates - warmup)
    return CosineLRScheduler(
        optimizer,
        t_initial=cosine_updates,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
