"""Each loss against a naive per-sample loop; perfect predictions beat shuffled ones; the image loss
under 2 processes equals the 1-process loss on the full batch."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losses


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def naive_patch_infonce(pred, target, positions, t):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            sims = [cos(pred[b, k], target[b, n]) / t for n in range(target.shape[1])]
            log_z = math.log(sum(math.exp(s) for s in sims))
            total += log_z - sims[positions[b, k]]
            count += 1
    return total / count


def naive_img_infonce(student, teacher, t):
    def one_way(queries, keys):
        total = 0.0
        for i in range(len(queries)):
            sims = [cos(queries[i], keys[j]) / t for j in range(len(keys))]
            total += math.log(sum(math.exp(s) for s in sims)) - sims[i]
        return total / len(queries)

    return 0.5 * (one_way(student, teacher) + one_way(teacher, student))


def naive_moco(q, k, t):
    total = 0.0
    for i in range(len(q)):
        sims = [cos(q[i], k[j]) / t for j in range(len(k))]
        total += math.log(sum(math.exp(s) for s in sims)) - sims[i]
    return total / len(q) * 2 * t


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    B, N, K, D = 3, 9, 4, 8
    target = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    positions = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    pred = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    return pred, target, positions


def test_patch_infonce_matches_loop(tokens):
    pred, target, positions = tokens
    got = losses.patch_infonce(pred, target, positions, 0.1).item()
    assert got == pytest.approx(naive_patch_infonce(pred, target, positions, 0.1), rel=1e-9)


def test_patch_regressions_match_loop(tokens):
    pred, target, positions = tokens
    B, K, D = pred.shape
    cos_ref, l1_ref = [], []
    for b in range(B):
        for k in range(K):
            t = target[b, positions[b, k]]
            cos_ref.append(1 - cos(pred[b, k], t))
            t_norm = (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5)
            diff = (pred[b, k] - t_norm).abs()
            l1_ref.append(float(torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()))
    assert losses.patch_cosine(pred, target, positions).item() == pytest.approx(
        sum(cos_ref) / len(cos_ref)
    )
    assert losses.patch_smoothl1(pred, target, positions).item() == pytest.approx(
        sum(l1_ref) / len(l1_ref)
    )


def test_patch_l1_matches_loop_on_raw_targets(tokens):
    """--patch_loss l1, the paper's regression baseline: |pred - teacher token| element by
    element, averaged, against the teacher's tokens as they are (no layer norm)."""
    pred, target, positions = tokens
    B, K, D = pred.shape
    total = 0.0
    for b in range(B):
        for k in range(K):
            for d in range(D):
                total += abs(float(pred[b, k, d]) - float(target[b, positions[b, k], d]))
    got = losses.patch_l1(pred, target, positions).item()
    assert got == pytest.approx(total / (B * K * D), rel=1e-9)
    # Scaled targets change it (a layer norm of the targets would hide the scale).
    assert losses.patch_l1(pred, 3 * target, positions).item() != pytest.approx(got, rel=1e-3)
    assert losses.PATCH_LOSSES['l1'] is losses.patch_l1


def test_img_and_moco_losses_match_loop():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    assert losses.img_infonce(student, teacher, 0.2).item() == pytest.approx(
        naive_img_infonce(student, teacher, 0.2), rel=1e-9
    )
    assert losses.moco_infonce(student, teacher, 0.2).item() == pytest.approx(
        naive_moco(student, teacher, 0.2), rel=1e-9
    )
    assert losses.img_cosine(student, teacher).item() == pytest.approx(
        1 - sum(cos(s, t) for s, t in zip(student, teacher)) / 6
    )


def test_perfect_prediction_beats_shuffled(tokens):
    _, target, positions = tokens
    perfect = torch.gather(target, 1, positions.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    shuffled = perfect[
        :, torch.randperm(perfect.shape[1], generator=torch.Generator().manual_seed(3))
    ]
    shuffled = torch.roll(shuffled, 1, dims=1)  # every prediction at a wrong position
    for loss in (losses.patch_infonce, losses.patch_cosine, losses.patch_smoothl1, losses.patch_l1):
        assert loss(perfect, target, positions, 0.1) < loss(shuffled, target, positions, 0.1)
    images = target[:, 0]
    for loss in (losses.img_infonce, losses.img_cosine, losses.moco_infonce):
        assert loss(images, images, 0.2) < loss(images.roll(1, dims=0), images, 0.2)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, student, teacher, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    local = slice(rank * 4, (rank + 1) * 4)
    s = student[local].clone().requires_grad_(True)
    loss = losses.img_infonce(s, teacher[local], 0.2)
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    moco = losses.moco_infonce(student[local], teacher[local], 0.2).detach()
    dist.all_reduce(moco)
    if rank == 0:
        out.put((value.item() / world_size, moco.item() / world_size, s.grad.abs().sum().item()))
    dist.destroy_process_group()


def test_global_batch_losses_under_two_processes():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 8, 16, generator=g)
    ctx = mp.get_context('spawn')
    out = ctx.Queue()
    mp.spawn(_worker, args=(2, _free_port(), student, teacher, out), nprocs=2, join=True)
    img, moco, grad = out.get(timeout=60)
    assert img == pytest.approx(losses.img_infonce(student, teacher, 0.2).item(), rel=1e-5)
    assert moco == pytest.approx(losses.moco_infonce(student, teacher, 0.2).item(), rel=1e-5)
    assert grad > 0  # the gradient flows through this rank's part of the gathered batch
