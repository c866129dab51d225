"""The training and evaluation loops. Nothing model-specific: a pre-training model's forward returns
(loss, dict of loss terms); a classifier is trained through `criterion`."""
import contextlib
import math

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy

from util import data
from util.features import knn_scores, topk_accuracy
from util.logging import MetricLogger, SmoothedValue

def autocast(device: torch.device, amp: str):
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def cosine_lr_scheduler(optimizer, args, batches_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up, then a half cosine to --min_lr, per optimizer update; a group's `lr_scale` multiplies it."""
    updates = math.ceil(batches_per_epoch / getattr(args, 'accum_iter', 1))  # as train_one_epoch steps
    warmup = args.warmup_epochs * updates
    return CosineLRScheduler(optimizer, t_initial=max(1, args.epochs * updates - warmup), lr_min=args.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


class Lars(torch.optim.Optimizer):
    """LARS as MAE (util/lars.py) and MoCo v3 (moco/optimizer.py) run it (You et al., 2017): SGD with momentum whose
    update d = g + wd w is scaled, in a group with `always_adapt`, by its trust ratio 0.001 |w| / |d| (1 if either norm
    is 0). timm's `Lars` divides by |g| + wd |w| (25 % off at wd 0.1), adapting only where wd > 0."""

    def __init__(self, params, lr: float, momentum: float = 0.9, trust_coeff: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, trust_coeff=trust_coeff, weight_decay=0.0,
                                      always_adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group['weight_decay'])
                if group['always_adapt']:
                    w_norm, d_norm = p.norm(), update.norm()
                    update.mul_(torch.where((w_norm > 0) & (d_norm > 0), group['trust_coeff'] * w_norm / d_norm, 1.0))
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                buffer = self.state[p]['momentum_buffer'].mul_(group['momentum']).add_(update)
                p.add_(buffer, alpha=-group['lr'])


def lars(groups: list, lr: float) -> Lars:
    """LARS with MAE's and MoCo v3's groups: each weight matrix adapted whatever its weight decay (at wd 0
    too: a probe's head would otherwise take SGD steps at lr 6.4); biases and norms neither adapted nor decayed."""
    split = []
    for group in groups:
        for adapt in (True, False):
            params = [p for p in group['params'] if (p.ndim > 1) == adapt]
            if params:
                split.append({**group, 'params': params, 'always_adapt': adapt,
                              **({} if adapt else {'weight_decay': 0.0})})
    return Lars(split, lr=lr)


def to_device(x, device):
    """Tensors (or tuples of them) to the device."""
    return tuple(to_device(t, device) for t in x) if isinstance(x, (list, tuple)) else x.to(device, non_blocking=True)


def check_finite(values: list, first_step: int, epoch: int, terms: dict, lr: float) -> None:
    """Stop the run on a non-finite loss, before any checkpoint of this epoch is written."""
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            shown = [f'{k} {v:.4g}' for k, v in terms.items()] + [f'lr {lr:.3g}']
            raise FloatingPointError(f'non-finite loss {value} at epoch {epoch}, step {first_step + offset} '
                                     f'({", ".join(shown)}). The last checkpoint is intact: resume from it with a '
                                     f'lower --blr, --clip_grad, or --amp bf16/none instead of fp16')


def train_one_epoch(model, data_loader, optimizer, lr_scheduler, scaler, device, epoch: int, args, log_writer=None,
                    teacher=None, momentum_schedule=None, criterion=None, mixup_fn=None, model_ema=None) -> dict:
    """One epoch, the lr set by `lr_scheduler` per optimizer step. With `--accum_iter k` gradients of k batches
    add up before a step (an epoch's last step may take fewer: none carries gradients into the next epoch)."""
    model.train(True)
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.2e}'))
    steps, accum = len(data_loader), args.accum_iter
    inner = getattr(model, '_orig_mod', model)  # the model inside torch.compile and DDP
    inner = getattr(inner, 'module', inner)
    optimizer.zero_grad(set_to_none=True)
    for step, (inputs, targets) in enumerate(logger.log_every(data_loader, args.print_freq, f'Epoch: [{epoch}]',
                                                              args.batch_size)):
        if step % accum == 0:
            lr_scheduler.step_update(epoch * math.ceil(steps / accum) + step // accum)
        inputs = to_device(inputs, device)
        update = (step + 1) % accum == 0 or step == steps - 1
        accumulated = min(accum, steps - step // accum * accum)  # batches in this step's accumulation
        sync = contextlib.nullcontext() if update or not args.distributed else model.no_sync()
        if momentum_schedule is not None:  # here, not in the forward: a compiled model would recompile for each m
            inner.update_momentum_encoder(momentum_schedule(epoch + step / steps))
        with sync:  # the backward too: DDP reduces the gradients in it
            with autocast(device, args.amp):
                if criterion is not None:  # supervised: fine-tuning, linear probing
                    targets = targets.to(device, non_blocking=True)
                    if mixup_fn is not None:
                        inputs, targets = mixup_fn(inputs, targets)
                    loss, terms = criterion(model(inputs), targets), {}
                else:
                    kwargs = {} if teacher is None else {'targets': teacher(inputs[0])}
                    loss, terms = model(*inputs, **kwargs)
            scaler.scale(loss / accumulated).backward()
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
        lr = max(group['lr'] for group in optimizer.param_groups)
        logger.update(loss=loss.detach(), lr=lr, **terms)
        # At the steps that log_every prints, before it prints: the flush here reads (in one host sync)
        # every loss since the last print, which would otherwise flush them unchecked.
        if step % args.print_freq == 0 or step == steps - 1:
            values = logger.meters['loss'].flush()
            check_finite(values, step + 1 - len(values), epoch, {k: logger.meters[k].value for k in terms}, lr)
    logger.synchronize_between_processes()
    print(f'Averaged stats: {logger}')
    stats = logger.averages()
    if log_writer is not None:
        for name, value in stats.items():
            log_writer.add_scalar(f'train/{name}', value, epoch)
    return stats


@torch.no_grad()
def evaluate(model, data_loader, device, args) -> dict:
    """Top-1/top-5 accuracy and cross-entropy of a classifier on a labelled loader."""
    model.eval()
    logger = MetricLogger()
    logger.meters.update((name, SmoothedValue()) for name in ('loss', 'acc1', 'acc5'))  # also on an empty shard
    for images, targets in logger.log_every(data_loader, args.print_freq, 'Test:'):
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        with autocast(device, args.amp):
            output = model(images)
            loss = torch.nn.functional.cross_entropy(output, targets)
        top1, top5 = accuracy(output, targets, topk=(1, min(5, output.shape[1])))
        for name, value in (('loss', loss), ('acc1', top1), ('acc5', top5)):
            logger.meters[name].update(value.item(), images.shape[0])
    logger.synchronize_between_processes()
    stats = logger.averages()
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats


@torch.no_grad()
def extract_features(backbone, dataset, device, args) -> tuple:
    """(features (N, D) float32, labels (N,)) of a whole data set in its order, on every rank."""
    loader = data.build_loader(dataset, args, is_train=False)
    features = [torch.empty(0, backbone.num_features, device=device)]  # a rank may get no image
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for images, targets in MetricLogger().log_every(loader, args.print_freq, 'Features:'):
        with autocast(device, args.amp):
            tokens = backbone.forward_features(images.to(device, non_blocking=True))
            features.append(backbone.forward_head(tokens, pre_logits=True).float())  # (B, D), before any head
        labels.append(targets.to(device))
    return data.gather_shards(torch.cat(features), len(dataset)), data.gather_shards(torch.cat(labels), len(dataset))


def knn_evaluate(backbone, train_set, val_set, device, args, k: int = 20, t: float = 0.07, chunk: int = 256) -> dict:
    """Top-1/top-5 (%) of DINO's weighted kNN, `train_set` the bank (main_linprobe.py --protocol knn, main_pretrain.py's
    monitor). The backbone runs in eval() (no drop path: no RNG drawn, an exact resume stays exact)."""
    was_training = backbone.training
    backbone.eval()
    (train_x, train_y), (val_x, val_y) = (extract_features(backbone, s, device, args) for s in (train_set, val_set))
    backbone.train(was_training)
    num_classes = len(val_set.classes)
    scores = knn_scores(train_x, train_y, val_x, num_classes, k, t, chunk)
    top1, top5 = topk_accuracy(scores, val_y, topk=(1, min(5, num_classes)))
    return {'acc1': top1, 'acc5': top5}
