"""The pre-training loop of every method (MimCo, MAE, MoCo v3, the grafted stage 2).

Nothing here is model-specific: a pre-training model's forward returns (loss, dict of loss terms).
"""

import torch

from util.logging import MetricLogger, SmoothedValue, epoch_stats
from util.misc import (
    accumulation_steps,
    autocast,
    gradient_sync,
    log_step,
    optimizer_update,
    to_device,
    unwrap,
)


def train_one_epoch(
    model: torch.nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    *,
    amp: str = 'none',
    accum_iter: int = 1,
    clip_grad: float = None,
    print_freq: int = 20,
    teacher: torch.nn.Module = None,
    momentum_schedule=None,
    log_writer=None,
) -> dict:
    """One epoch of pre-training; returns the epoch's average loss, loss terms and lr.

    Each batch is the tuple of tensors the model's forward takes (views, masks). `teacher`
    (MimCo) gives the targets of the first view; `momentum_schedule(epoch progress)` (MoCo v3)
    gives the key encoder's momentum. With `accum_iter` k, the gradients of k batches add up
    before each optimizer update; an epoch's last update may add up fewer, so none carries
    gradients into the next epoch. `lr_scheduler` sets the lr at each update.
    """
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.2e}'))
    batches = len(data_loader)
    steps = accumulation_steps(
        model, data_loader, optimizer, lr_scheduler, logger, epoch, accum_iter, print_freq
    )
    for step, (inputs, _), need_update, batches_in_update in steps:
        inputs = to_device(inputs, device)

        if momentum_schedule is not None:
            # Here, not in the forward: a compiled model would recompile for each momentum.
            momentum = momentum_schedule(epoch + step / batches)
            unwrap(model).update_momentum_encoder(momentum)

        # The backward too runs under the sync context: DDP reduces the gradients in it.
        with gradient_sync(model, need_update):
            with autocast(device, amp):
                if teacher is None:
                    loss, terms = model(*inputs)
                else:
                    targets = teacher(inputs[0])
                    loss, terms = model(*inputs, targets=targets)
            scaler.scale(loss / batches_in_update).backward()

        if need_update:
            optimizer_update(model, optimizer, scaler, clip_grad)
        log_step(logger, optimizer, loss, terms, step, batches, print_freq, epoch)

    return epoch_stats(logger, epoch, log_writer)
