"""Patch masks: BEiT block-wise masks (MimCo) and uniform random masks (MAE).

Every mask here masks *exactly* `round(mask_ratio * N)` patches of each image (MAE's keeps
exactly `int(N * (1 - mask_ratio))`, as its random_masking), so a batch of masked tokens reshapes to
(B, K, D) without padding.
"""

import math
import random

import torch

from util.errors import InputError


def check_mask_ratio(mask_ratio: float) -> None:
    """Raises InputError unless 0 < mask_ratio < 1."""
    if not 0.0 < mask_ratio < 1.0:
        raise InputError(
            f'--mask_ratio must lie in (0, 1), got {mask_ratio}: '
            f'use e.g. 0.4 (MimCo, block) or 0.75 (MAE, random)'
        )


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """round(mask_ratio * num_patches), kept within 1 .. num_patches - 1: some patch of each image
    is masked and some is seen."""
    check_mask_ratio(mask_ratio)
    return max(1, min(num_patches - 1, round(mask_ratio * num_patches)))


class BlockMaskGenerator:
    """BEiT's block-wise masking (Bao et al., 2022, Alg. 1), topped up to an exact count.

    Blocks of at least `min_patches` patches with log-uniform aspect ratio are added until no block
    fits the remaining budget; the few patches still missing are then masked at random.
    Uses Python's `random`, which DataLoader seeds per worker and the checkpoint restores.
    """

    def __init__(
        self, grid_size: tuple, mask_ratio: float, min_patches: int = 4, min_aspect: float = 0.3
    ):
        self.height, self.width = grid_size
        self.num_masked = num_masked(self.height * self.width, mask_ratio)
        self.min_patches = min_patches
        # The aspect ratio r is drawn log-uniformly from [min_aspect, 1 / min_aspect].
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: torch.Tensor, budget: int) -> int:
        """Mask one block of at most `budget` new patches (10 tries, as BEiT); returns how many it
        added (0 when no try fitted)."""
        for _ in range(10):
            # Alg. 1: an area s and an aspect ratio r make a block of sqrt(s r) by sqrt(s / r).
            area = random.uniform(self.min_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h <= self.height and 0 < w <= self.width):
                continue
            top = random.randint(0, self.height - h)
            left = random.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]  # a view: filling it fills the mask
            added = h * w - int(block.sum())  # the block may overlap patches masked already
            if 0 < added <= budget:
                block.fill_(True)
                return added
        return 0

    def __call__(self) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while self.num_masked - count >= self.min_patches:
            added = self._add_block(mask, self.num_masked - count)
            if added == 0:
                break
            count += added
        # Top up to the exact count with patches drawn at random among the unmasked ones.
        free = (~mask).flatten().nonzero().flatten().tolist()
        for index in random.sample(free, self.num_masked - count):
            mask.view(-1)[index] = True
        return mask.flatten()  # (N,) True = masked


class RandomMaskGenerator:
    """Uniform random masks of an exact count (SimMIM-style random masking for the mask-token
    student)."""

    def __init__(self, grid_size: tuple, mask_ratio: float):
        self.num_patches = grid_size[0] * grid_size[1]
        self.num_masked = num_masked(self.num_patches, mask_ratio)

    def __call__(self) -> torch.Tensor:
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[random.sample(range(self.num_patches), self.num_masked)] = True
        return mask  # (N,)


def build_mask_generator(mask_type: str, grid_size: tuple, mask_ratio: float):
    """--mask_type block or random (argparse allows nothing else)."""
    if mask_type == 'block':
        return BlockMaskGenerator(grid_size, mask_ratio)
    return RandomMaskGenerator(grid_size, mask_ratio)


class MaskNoiseGenerator:
    """MAE's per-image masking noise, drawn in the data pipeline so that it is seeded per sample
    (util.data.SeededSamples): the masks then do not depend on the number of processes."""

    def __init__(self, grid_size: tuple):
        self.num_patches = grid_size[0] * grid_size[1]

    def __call__(self) -> torch.Tensor:
        return torch.rand(self.num_patches)  # (N,)


def mae_num_keep(num_patches: int, mask_ratio: float) -> int:
    """MAE's count of visible patches, int(N * (1 - mask_ratio)) (random_masking): int() and not
    round(), 19 of 196 kept at 0.9 (round would keep 20). Raises InputError where that keeps no
    patch (e.g. 16 patches at 0.95), which the official code would train on: an encoder that sees
    no patch of the image."""
    check_mask_ratio(mask_ratio)
    num_keep = int(num_patches * (1 - mask_ratio))
    if num_keep == 0:
        raise InputError(
            f'--mask_ratio {mask_ratio} keeps int({num_patches} x (1 - {mask_ratio})) = 0 of the '
            f"{num_patches} patches (MAE's count): lower it, e.g. to 0.75 (MAE)"
        )
    return num_keep


def random_masking_indices(
    batch_size: int, num_patches: int, mask_ratio: float, device=None, noise: torch.Tensor = None
) -> tuple:
    """MAE's per-sample random masking by sorting noise (He et al., 2022, Sec. 3).

    `noise` (B, N), uniform in [0, 1), may come from the data loader. Returns ids_keep (B, N_keep),
    ids_restore (B, N) and mask (B, N) with 1 = masked, 0 = kept, in the original patch order:
    `gather(cat(kept, masked), ids_restore)` undoes the shuffle.
    """
    num_keep = mae_num_keep(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)  # (B, N)
    # The patches of the smallest noise are kept.
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]  # (B, N_keep)
    # The mask in shuffled order (kept first), then unshuffled to the patches' order.
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N)
    return ids_keep, ids_restore, mask
