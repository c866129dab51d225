"""LARS (You et al., 2017) as MAE (util/lars.py) and MoCo v3 (moco/optimizer.py) run it."""

import torch


class Lars(torch.optim.Optimizer):
    """SGD with momentum whose update d = g + wd w is scaled by its trust ratio 0.001 |w| / |d|.

    The ratio applies in a group with `always_adapt` (it is 1 where either norm is 0). timm's
    `Lars` divides by |g| + wd |w| instead (25 % off at wd 0.1) and adapts only where wd > 0, so it
    is not the optimizer of the papers' linear probes.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, trust_coeff: float = 0.001):
        defaults = dict(
            lr=lr, momentum=momentum, trust_coeff=trust_coeff, weight_decay=0.0, always_adapt=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group['weight_decay'])
                if group['always_adapt']:
                    w_norm = p.norm()
                    d_norm = update.norm()
                    both_positive = (w_norm > 0) & (d_norm > 0)
                    trust_ratio = torch.where(
                        both_positive, group['trust_coeff'] * w_norm / d_norm, 1.0
                    )
                    update.mul_(trust_ratio)
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                buffer = self.state[p]['momentum_buffer']
                buffer.mul_(group['momentum']).add_(update)
                p.add_(buffer, alpha=-group['lr'])


def lars(groups: list, lr: float) -> Lars:
    """LARS with MAE's and MoCo v3's parameter groups.

    Each weight matrix is adapted whatever its weight decay (at wd 0 too: a probe's head would
    otherwise take plain SGD steps at lr 6.4); biases and norms are neither adapted nor decayed.
    """
    split = []
    for group in groups:
        matrices = [p for p in group['params'] if p.ndim > 1]
        vectors = [p for p in group['params'] if p.ndim <= 1]
        if matrices:
            split.append({**group, 'params': matrices, 'always_adapt': True})
        if vectors:
            split.append({**group, 'params': vectors, 'always_adapt': False, 'weight_decay': 0.0})
    return Lars(split, lr=lr)
