"""Frozen-feature evaluation: the frozen backbone whose forward gives one feature vector per image,
DINO's weighted kNN and Layer Grafted's logistic regression on those features. Used by
main_linprobe.py, the kNN monitor of main_pretrain.py (engine_finetune.knn_evaluate) and
tools/visualize.py.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import backbones


def frozen_backbone(
    checkpoint: str, model_name: str, input_size: int, global_pool: bool, seed: int
) -> nn.Module:
    """The frozen backbone in eval(), whose forward gives one feature vector per image (B, D).

    `checkpoint` is a file of any format util/backbones.py reads, or `random` for a random-init
    `model_name` drawn from `seed` alone: the same on every process (the frozen backbone is not
    in DDP, which would otherwise broadcast rank 0's weights). The features are the mean of the
    normed patch tokens with `global_pool` (always for a ViT without a class token), else the
    final-norm CLS token.
    """
    path = None
    if checkpoint != 'random':
        path = checkpoint
    model = backbones.build_backbone(path, model_name, input_size, seed=seed)
    if not global_pool and not model.has_class_token:
        print('the backbone has no class token: features = the average of its patch tokens')
        global_pool = True
    if global_pool:
        model.reset_classifier(0, 'avg')
    else:
        model.reset_classifier(0, 'token')
    return model.eval().requires_grad_(False)


def backbone_fingerprint(backbone) -> float:
    """A number that changes with any backbone weight (the sum of the float weights and of their
    squares, in float64): a resume checks it against its checkpoint's."""
    total = 0.0
    for value in backbone.state_dict().values():
        if not value.is_floating_point():
            continue
        value = value.detach().double()
        total += value.sum().item() + value.square().sum().item()
    return total


@torch.no_grad()
def knn_scores(
    train_x, train_y, test_x, num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 256
) -> torch.Tensor:
    """DINO's weighted kNN: each of the k most cosine-similar training features votes for its class
    with weight exp(sim / t). Blocks of `chunk` test features keep memory at chunk x N_train.
    Returns the votes (N_test, C); a class no neighbour voted for scores -inf (no prediction)."""
    train_x = F.normalize(train_x, dim=1)  # (N_train, D)
    test_x = F.normalize(test_x, dim=1)  # (N_test, D)
    k = min(k, train_x.shape[0])
    scores = []
    for block in test_x.split(chunk):
        sim = block @ train_x.T  # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(block.shape[0], num_classes, device=block.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())  # (b, C)
        voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, train_y[top_idx], True)
        scores.append(votes.masked_fill(~voted, -math.inf))
    return torch.cat(scores)


def topk_accuracy(scores, targets, topk: tuple) -> list:
    """timm's accuracy (%), except that a class scored -inf is no prediction: with k = 1 neighbour,
    kNN's top-5 is its top-1, not four more classes drawn from the ties at zero votes."""
    values, predicted = scores.topk(max(topk), dim=1)  # (N, max k)
    hits = (predicted == targets[:, None]) & (values > -math.inf)
    return [hits[:, :k].any(dim=1).float().mean().item() * 100 for k in topk]


def center_normalize(*features) -> tuple:
    """Each feature vector centred on its own mean and scaled to unit length: the Layer Grafted
    code's preprocessing (cyanure's `preprocess(centering=True, normalize=True, columns=False)`),
    per row, so train and val need nothing from each other."""
    return tuple(F.normalize(x - x.mean(dim=1, keepdim=True), dim=1) for x in features)


def logistic_regression(
    train_x, train_y, num_classes: int, weight_decay: float, max_iter: int = 1000
) -> nn.Linear:
    """argmin_W mean_i CE(W x_i, y_i) + weight_decay / 2 |W|^2 by full-batch L-BFGS in float64; no
    bias, as the Layer Grafted code fits it (`fit_intercept=False`)."""
    x = train_x.double()  # (N, D)
    linear = nn.Linear(x.shape[1], num_classes, bias=False, dtype=torch.float64, device=x.device)
    nn.init.zeros_(linear.weight)
    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn='strong_wolfe',
    )

    def closure():
        optimizer.zero_grad()
        cross_entropy = F.cross_entropy(linear(x), train_y)
        l2_penalty = 0.5 * weight_decay * linear.weight.square().sum()
        loss = cross_entropy + l2_penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.requires_grad_(False)
