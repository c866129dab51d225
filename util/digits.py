"""The built-in data set: with no `--data_path` every script uses `digits`, scikit-learn's 1,797
real 8x8 handwritten digits (10 classes), split train/val with a fixed seed and upsampled to
`--input_size` (util/transforms.py: digits_view, eval_transform), so that everything runs on a fresh
machine with no download.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Digits(Dataset):
    """scikit-learn's digits as 3-channel PIL images; a seeded, stratified 80/20 train/val split."""

    def __init__(self, train: bool, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        train_idx, val_idx = train_test_split(
            np.arange(len(digits.target)),
            test_size=DIGITS_VAL_FRACTION,
            random_state=DIGITS_SPLIT_SEED,
            stratify=digits.target,
        )
        if train:
            keep = np.sort(train_idx)
        else:
            keep = np.sort(val_idx)
        # scikit-learn's pixels are counts 0..16 (of a 4x4 block of a 32x32 bitmap): to 0..255.
        self.images = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8)
        self.targets = digits.target[keep].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index], mode='L').convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class DigitsJitter(torch.nn.Module):
    """A random rotation (within +-`degrees`), scale and sub-pixel shift (within +-`translate` of
    the side) of images (..., C, H, W) in [0, 1], by bilinear resampling with the border pixels
    extended.

    The 8x8 digits touch their frame, so a black margin (torchvision's RandomAffine fills with a
    constant) would make every view unlike the val images, and whole-pixel shifts (its translations
    are rounded) are coarse on a 16 px image: a MimCo student on the demo's teacher lost 3.6 kNN
    points with the black margin and 1.3 with whole-pixel shifts (docs/demo.md, the controlled
    comparison).
    """

    def __init__(self, degrees: float = 10.0, scale: tuple = (0.85, 1.1), translate: float = 0.05):
        super().__init__()
        self.degrees = degrees
        self.scale = scale
        self.translate = translate

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        angle = math.radians(torch.empty(()).uniform_(-self.degrees, self.degrees).item())
        scale = torch.empty(()).uniform_(*self.scale).item()
        # In affine_grid's units the side is 2 (from -1 to 1).
        shift = torch.empty(2).uniform_(-2 * self.translate, 2 * self.translate)
        # Output pixel -> input pixel: a rotation by `angle` scaled by `scale`, then the shift.
        theta = torch.tensor(
            [
                [scale * math.cos(angle), -scale * math.sin(angle), shift[0]],
                [scale * math.sin(angle), scale * math.cos(angle), shift[1]],
            ]
        )
        batch = image.reshape(-1, *image.shape[-3:])  # (B, C, H, W)
        grid = F.affine_grid(theta.expand(len(batch), 2, 3), list(batch.shape), align_corners=False)
        jittered = F.grid_sample(batch, grid, padding_mode='border', align_corners=False)
        return jittered.reshape(image.shape)
