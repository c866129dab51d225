"""The pieces of the official linear-classification recipes (engine_probe.py runs them): the cosine
per epoch of MoCo v3's main_lincls.py, and Layer Grafted's main_lincls_sweep.py: many linear heads
trained in one pass over the same features, each with its own lr and weight decay, the best chosen
on a held-out part of train.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

from util.dist import is_dist_avail_and_initialized
from util.errors import InputError

# Layer Grafted's sweep (main_lincls_sweep.py): lrs per 256 images {1, 3, 5, 7, 9} x 10^k for
# k = -5 .. 1 (35 values), each with weight decay 0 and 1e-6; heads in that order, lr outer.
SWEEP_BASE_LRS = tuple(base * 10.0**k for k in range(-5, 2) for base in (1, 3, 5, 7, 9))
SWEEP_WEIGHT_DECAYS = (0.0, 1e-6)


class SweepHeads(nn.Module):
    """H linear heads on the same features in one batched matmul (Layer Grafted's
    LinearClassifier, 70 of them): weight (H, C, D) from N(0, 0.01), bias (H, C) zero.
    forward: features (B, D) -> logits (H, B, C)."""

    def __init__(self, num_heads: int, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_heads, num_classes, dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))

    def forward(self, features):
        # In float32 under any --amp: the sweep's largest lrs grow logits that fp16 cannot hold.
        with torch.autocast(features.device.type, enabled=False):
            logits = torch.einsum('bd,hcd->hbc', features.float(), self.weight)  # (H, B, C)
            return logits + self.bias[:, None, :]


def sweep_loss(logits, targets):
    """The sum over heads of each head's mean cross-entropy: each head gets the gradient it would
    get trained alone. logits (H, B, C), targets (B,)."""
    num_heads = logits.shape[0]
    per_sample = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.repeat(num_heads), reduction='none'
    )
    return per_sample.view(num_heads, -1).mean(dim=1).sum()


class SweepSGD(torch.optim.Optimizer):
    """Plain SGD (momentum 0, weight decay added to the gradient, as torch.optim.SGD) with its own
    lr and weight decay per head: dim 0 of each parameter is the head. The group's `lr` is the
    schedule's factor (1 at the start); head h steps by factor x head_lrs[h]."""

    def __init__(self, params, head_lrs: torch.Tensor, head_wds: torch.Tensor):
        defaults = dict(lr=1.0, head_lrs=head_lrs, head_wds=head_wds)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            with_grad = [p for p in group['params'] if p.grad is not None]
            for p in with_grad:
                shape = (-1,) + (1,) * (p.ndim - 1)  # one value per head, broadcast
                lrs = (group['lr'] * group['head_lrs']).to(p).view(shape)
                wds = group['head_wds'].to(p).view(shape)
                p.sub_(lrs * (p.grad + wds * p))
        return None


def cosine_per_epoch(lr: float, epoch: int, epochs: int) -> float:
    """lr x 0.5 (1 + cos(pi epoch / epochs)): MoCo v3's adjust_learning_rate (main_lincls.py) and
    torch's CosineAnnealingLR stepped once an epoch (Layer Grafted); no warm-up."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class EpochCosine:
    """The schedule of cosine_per_epoch, with the `step_update(num_updates)` of timm's schedulers
    that train_one_epoch calls: the lr is constant within an epoch."""

    def __init__(self, optimizer, epochs: int, updates: int):
        self.optimizer = optimizer
        self.epochs = epochs
        self.updates = updates
        for group in optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])

    def step_update(self, num_updates: int) -> None:
        epoch = num_updates // self.updates
        for group in self.optimizer.param_groups:
            group['lr'] = cosine_per_epoch(group['initial_lr'], epoch, self.epochs)


def sweep_grid(total_batch: int) -> tuple:
    """(absolute lrs (H,), weight decays (H,)) of the 70 heads, lr = base x total batch / 256 as
    main_lincls_sweep.py (batch x world size / 256)."""
    lrs = []
    wds = []
    for base in SWEEP_BASE_LRS:
        for wd in SWEEP_WEIGHT_DECAYS:
            lrs.append(base * total_batch / 256)
            wds.append(wd)
    return torch.tensor(lrs, dtype=torch.float64), torch.tensor(wds, dtype=torch.float64)


@torch.no_grad()
def head_accuracies(model, data_loader, device) -> dict:
    """Top-1 and top-5 accuracy (%) of every head of a SweepHeads model: {'acc1': (H,), 'acc5':
    (H,)}, counted over every process's shard."""
    model.eval()
    hits = None
    seen = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in data_loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(inputs).float()  # (H, B, C)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, B, k)
        correct = top5 == targets[None, :, None]
        batch_hits = torch.stack([correct[..., 0].sum(1), correct.any(-1).sum(1)])  # (2, H)
        if hits is None:
            hits = torch.zeros_like(batch_hits, dtype=torch.float64)
        hits += batch_hits
        seen += len(targets)
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(hits)
        torch.distributed.all_reduce(seen)
    accuracy = hits / seen * 100
    return {'acc1': accuracy[0].cpu(), 'acc5': accuracy[1].cpu()}


def best_head(accuracy: torch.Tensor) -> int:
    """The index of the best head; a tie goes to the later head, as `>=` in
    main_lincls_sweep.py."""
    flipped = accuracy.flip(0).argmax().item()
    return len(accuracy) - 1 - flipped


def holdout_split(train_set, eval_transform, fraction: float, seed: int) -> tuple:
    """(training part, held-out part) of `train_set`: round(fraction x N) images (at least 1)
    drawn by `seed`, held out with the eval transform, to choose the sweep's head on."""
    base = train_set
    indices = list(range(len(train_set)))
    if isinstance(train_set, Subset):  # a labelled subset: split its images
        base = train_set.dataset
        indices = list(train_set.indices)
    held = max(1, round(fraction * len(indices)))
    if held >= len(indices):
        raise InputError(
            f'--sweep_holdout {fraction} holds out all {len(indices)} training images: '
            f'lower it, or choose on val with --select_on_val'
        )
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    held_indices = sorted(indices[i] for i in order[:held].tolist())
    kept_indices = sorted(indices[i] for i in order[held:].tolist())
    eval_base = copy.copy(base)  # the same images (no second scan of a folder), another transform
    eval_base.transform = eval_transform
    return Subset(base, kept_indices), Subset(eval_base, held_indices)
