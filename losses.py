"""The losses, as pure functions of tensors. Every input is float32; shapes in the docstrings."""

import torch
import torch.nn.functional as F

from models_vit import gather_tokens
from util.dist import all_gather, get_rank


def moco_infonce(
    q: torch.Tensor, k: torch.Tensor, temperature: float, reduction: str = 'mean'
) -> torch.Tensor:
    """MoCo v3's InfoNCE (Chen et al., 2021, Alg. 1): q (B, D) against the keys k of the *global*
    batch; the positive of row i is key i of this rank. Scaled by 2T as in the paper's code.
    `reduction` 'none': each query's term (B,), whose mean is the loss."""
    q = F.normalize(q, dim=1)
    k = all_gather(F.normalize(k, dim=1), keep_local_grad=False)  # (B * world, D)
    logits = q @ k.t() / temperature  # (B, B * world)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * get_rank()
    return F.cross_entropy(logits, labels, reduction=reduction) * (2 * temperature)


def patch_infonce(
    pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """MimCo's patch-level contrastive reconstruction (our reading of Sec. 3.2).

    pred (B, K, D): the student's predictions at the K masked positions of each image; target
    (B, N, D): the teacher's patch tokens; positions (B, K): where the predictions belong.
    Positive: the teacher token at its position; negatives: the image's other N - 1."""
    pred = F.normalize(pred, dim=-1)
    target = F.normalize(target, dim=-1)
    logits = torch.bmm(pred, target.transpose(1, 2)) / temperature  # (B, K, N)
    return F.cross_entropy(logits.flatten(0, 1), positions.flatten())


def patch_smoothl1(
    pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, temperature: float = None
) -> torch.Tensor:
    """Ablation: regress the layer-normed teacher tokens at the masked positions (smooth L1)."""
    return F.smooth_l1_loss(pred, F.layer_norm(gather_tokens(target, positions), target.shape[-1:]))


def patch_l1(
    pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, temperature: float = None
) -> torch.Tensor:
    """Ablation, the regression baseline MimCo compares its contrastive loss with: the mean
    absolute difference to the teacher's tokens at the masked positions, as they are (no layer
    norm of the targets, no negatives). pred (B, K, D), target (B, N, D), positions (B, K)."""
    return F.l1_loss(pred, gather_tokens(target, positions))


def patch_cosine(
    pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, temperature: float = None
) -> torch.Tensor:
    """Ablation: 1 - cosine similarity to the teacher tokens at the masked positions."""
    return 1 - F.cosine_similarity(pred, gather_tokens(target, positions), dim=-1).mean()


def img_infonce(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """MimCo's image-level contrastive reconstruction (our reading of Sec. 3.2), symmetrised.

    student (B, D), teacher (B, D): image i's positive is its own teacher target; the negatives
    are the other images of the global batch (all-gathered; the gradient flows through the local
    part)."""
    student = F.normalize(student, dim=1)
    teacher = F.normalize(teacher, dim=1)
    labels = torch.arange(student.shape[0], device=student.device) + student.shape[0] * get_rank()
    student_to_teacher = student @ all_gather(teacher, keep_local_grad=False).t() / temperature
    teacher_to_student = teacher @ all_gather(student, keep_local_grad=True).t() / temperature
    return 0.5 * (
        F.cross_entropy(student_to_teacher, labels) + F.cross_entropy(teacher_to_student, labels)
    )


def img_cosine(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = None
) -> torch.Tensor:
    """Ablation: 1 - cosine similarity between student and teacher image embeddings."""
    return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()


PATCH_LOSSES = {
    'infonce': patch_infonce,
    'smoothl1': patch_smoothl1,
    'l1': patch_l1,
    'cosine': patch_cosine,
}
IMG_LOSSES = {'infonce': img_infonce, 'cosine': img_cosine}
