"""The pre-training loop of every method (MimCo, MAE, MoCo v3, the grafted stage 2).

Nothing here is model-specific: a pre-training model's forward returns (loss, dict of loss terms).
"""

import torch

from util.logging import MetricLogger, SmoothedValue, epoch_stats
from util.lr_sched import updates_per_epoch
from util.misc import autocast, check_losses, gradient_sync, to_device, unwrap


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
    model.train(True)
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.2e}'))
    batches = len(data_loader)
    updates = updates_per_epoch(batches, accum_iter)
    header = f'Epoch: [{epoch}]'
    optimizer.zero_grad(set_to_none=True)
    # For images/s; the benchmarks pass a list of batches, which has no batch size.
    batch_size = getattr(data_loader, 'batch_size', None)
    steps = logger.log_every(data_loader, print_freq, header, batch_size)
    for step, (inputs, _) in enumerate(steps):
        update_index, batch_in_update = divmod(step, accum_iter)
        if batch_in_update == 0:
            lr_scheduler.step_update(epoch * updates + update_index)
        need_update = (step + 1) % accum_iter == 0 or step == batches - 1
        # The batches this update adds up: accum_iter, or fewer in the epoch's last update.
        batches_in_update = min(accum_iter, batches - update_index * accum_iter)
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
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        lr = max(group['lr'] for group in optimizer.param_groups)
        logger.update(loss=loss.detach(), lr=lr, **terms)
        check_losses(logger, step, batches, print_freq, epoch, terms, lr)

    return epoch_stats(logger, epoch, log_writer)
