"""The training step both regimes share (engine_pretrain.py, engine_finetune.py): what a loop
reads besides the model and the batches (LoopSettings), the epoch's batches grouped into optimizer
updates with --accum_iter, the update itself, and the loss log with its check for non-finite
values. What both loops need lives here; what is not about the loop, in util/."""

import contextlib
import dataclasses
import math

import torch

from util.lr_sched import updates_per_epoch


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


@dataclasses.dataclass
class LoopSettings:
    """What a training loop reads besides the model and the batches: the device, how gradients
    become updates (the optimizer, its per-update lr schedule, the AMP loss scaler, --amp,
    --accum_iter, --clip_grad) and how the loop reports (--print_freq, a TensorBoard writer)."""

    device: torch.device
    optimizer: torch.optim.Optimizer
    lr_scheduler: object  # util.lr_sched: step_update(update index) sets the lr
    scaler: torch.amp.GradScaler
    amp: str = 'none'
    accum_iter: int = 1
    clip_grad: float = None
    print_freq: int = 20
    log_writer: object = None

    @classmethod
    def from_args(cls, args, device, optimizer, lr_scheduler, scaler, log_writer):
        """From the flags --amp, --accum_iter, --clip_grad and --print_freq."""
        return cls(
            device,
            optimizer,
            lr_scheduler,
            scaler,
            amp=args.amp,
            accum_iter=args.accum_iter,
            clip_grad=args.clip_grad,
            print_freq=args.print_freq,
            log_writer=log_writer,
        )


def accumulation_steps(model: torch.nn.Module, data_loader, loop: LoopSettings, logger, epoch: int):
    """A training epoch's batches, each as (step, batch, need_update, batches_in_update).

    Puts the model in train mode, prints the progress through `logger`, and sets the lr at each
    update's first batch. With `loop.accum_iter` k, the gradients of k batches add up before each
    optimizer update; an epoch's last update may add up fewer, so none carries gradients into the
    next epoch: `batches_in_update` is what the loss is divided by.
    """
    model.train(True)
    batches = len(data_loader)
    accum_iter = loop.accum_iter
    updates = updates_per_epoch(batches, accum_iter)
    loop.optimizer.zero_grad(set_to_none=True)
    # For images/s; the benchmarks pass a list of batches, which has no batch size.
    batch_size = getattr(data_loader, 'batch_size', None)
    steps = logger.log_every(data_loader, loop.print_freq, f'Epoch: [{epoch}]', batch_size)
    for step, batch in enumerate(steps):
        update_index, batch_in_update = divmod(step, accum_iter)
        if batch_in_update == 0:
            loop.lr_scheduler.step_update(epoch * updates + update_index)
        need_update = (step + 1) % accum_iter == 0 or step == batches - 1
        # The batches this update adds up: accum_iter, or fewer in the epoch's last update.
        batches_in_update = min(accum_iter, batches - update_index * accum_iter)
        yield step, batch, need_update, batches_in_update


def optimizer_update(model, loop: LoopSettings) -> None:
    """One update from the gradients added up since the last, clipped to norm --clip_grad."""
    if loop.clip_grad:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)


def log_step(logger, loop: LoopSettings, loss, terms: dict, step: int, batches: int, epoch: int):
    """Record a step's loss, loss terms and lr, and check the losses where log_every prints."""
    lr = max(group['lr'] for group in loop.optimizer.param_groups)
    logger.update(loss=loss.detach(), lr=lr, **terms)
    check_losses(logger, step, batches, loop.print_freq, epoch, terms, lr)


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
