"""The pre-training loop of every method (MimCo, MAE, MoCo v3, the grafted stage 2).

Nothing here is model-specific: a pre-training model's forward returns (loss, dict of loss terms).
"""

import torch

import engine
from util import misc
from util.logging import epoch_stats, training_logger


def train_one_epoch(
    model: torch.nn.Module,
    data_loader,
    loop: engine.LoopSettings,
    epoch: int,
    *,
    teacher: torch.nn.Module = None,
    momentum_schedule=None,
) -> dict:
    """One epoch of pre-training; returns the epoch's average loss, loss terms and lr.

    Each batch is the tuple of tensors the model's forward takes (views, masks). `teacher`
    (MimCo) gives the targets of the first view; `momentum_schedule(epoch progress)` (MoCo v3)
    gives the key encoder's momentum. With `loop.accum_iter` k, the gradients of k batches add
    up before each optimizer update; an epoch's last update may add up fewer, so none carries
    gradients into the next epoch. `loop.lr_scheduler` sets the lr at each update.
    """
    logger = training_logger()
    batches = len(data_loader)
    steps = engine.accumulation_steps(model, data_loader, loop, logger, epoch)
    for step, (inputs, _), need_update, batches_in_update in steps:
        inputs = misc.to_device(inputs, loop.device)

        if momentum_schedule is not None:
            # Here, not in the forward: a compiled model would recompile for each momentum.
            momentum = momentum_schedule(epoch + step / batches)
            misc.unwrap(model).update_momentum_encoder(momentum)

        # The backward too runs under the sync context: DDP reduces the gradients in it.
        with engine.gradient_sync(model, need_update):
            with misc.autocast(loop.device, loop.amp):
                if teacher is None:
                    loss, terms = model(*inputs)
                else:
                    targets = teacher(inputs[0])
                    loss, terms = model(*inputs, targets=targets)
            loop.scaler.scale(loss / batches_in_update).backward()

        if need_update:
            engine.optimizer_update(model, loop)
        engine.log_step(logger, loop, loss, terms, step, batches, epoch)

    return epoch_stats(logger, epoch, loop.log_writer)
