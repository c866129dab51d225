"""Pictures of what a ViT learned, as matplotlib figures: CLS attention maps of the last block, MAE
reconstructions, MimCo masks and t-SNE panels, which `tools/visualize.py` saves as PNG. Figure sizes
are fixed (inches x DPI): a PNG's pixel size is known in advance.
"""

import contextlib
import io
import random

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: files only, never a window
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util import data, transforms

DPI = 100
PANEL = 1.5  # inches per image in the image grids
TSNE_PANEL = 4.0  # inches per t-SNE panel
# The file name of each method's masking figure.
MASKING_NAMES = {'mae': 'mae_reconstruction', 'mimco': 'mimco_masks'}


@contextlib.contextmanager
def seeded(seed: int = 0):
    """Fixed masks and samples for pictures, the caller's RNG streams (torch, CUDA, Python's
    `random`) untouched."""
    state = random.getstate()
    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def sample_images(args, num_images: int) -> torch.Tensor:
    """`num_images` val images spread evenly over the val set, eval transform: (B, C, H, W)."""
    dataset = data.build_dataset(args, is_train=False, transform=transforms.eval_transform(args))
    indices = np.linspace(0, len(dataset) - 1, num_images).round()
    return torch.stack([dataset[int(i)][0] for i in indices])


def to_display(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (B, C, H, W) -> (B, H, W, C) in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, -1, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def image_rows_figure(rows: dict, maps: dict = None):
    """One row of images per entry (`rows`: title -> (B, H, W, C) array); a row with maps in `maps`
    (title -> (B, H, W) array) shows them in colour over its images in grey."""
    maps = maps or {}
    columns = len(next(iter(rows.values())))  # the images of the first row
    fig = Figure(figsize=(PANEL * columns, PANEL * len(rows)), dpi=DPI)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for (title, images), row_axes in zip(rows.items(), axes):
        for j, ax in enumerate(row_axes):
            ax.set_axis_off()
            if title in maps:
                ax.imshow(images[j].mean(-1), cmap='gray')
                ax.imshow(maps[title][j], cmap='inferno', alpha=0.6)
            else:
                ax.imshow(images[j])
        row_axes[0].set_title(title, fontsize=8, loc='left')
    fig.tight_layout()
    return fig


def attention_figure(images: torch.Tensor, maps: dict):
    """First row the images; then one row per backbone (`maps`: name -> (B, heads, h, w)) with the
    head-averaged CLS attention over the image."""
    shown = to_display(images)
    rows = {'image': shown}
    overlays = {}
    for name, attention in maps.items():
        title = f'{name}: CLS attention'
        head_mean = attention.float().mean(1, keepdim=True)  # (B, 1, h, w)
        # Each patch's weight on each of its pixels: (B, 1, H, W)
        pixels = F.interpolate(head_mean, images.shape[-2:], mode='nearest')
        overlays[title] = pixels[:, 0].cpu().numpy()
        rows[title] = shown
    return image_rows_figure(rows, overlays)


def masking_figure(
    images: torch.Tensor, patch_size: int, seed: int = 0, mae=None, mask_generator=None
):
    """The images and the same with the masked patches in grey: an `mae`'s random masks and its
    reconstruction with the visible patches pasted back (MAE, He et al., 2022, Fig. 2 style), or the
    masks of MimCo's `mask_generator` (the student's input)."""
    with seeded(seed):
        if mae is not None:
            prediction, mask = mae.reconstruct(images)  # (B, C, H, W), (B, N) 1 = masked
        else:
            mask = torch.stack([mask_generator() for _ in range(len(images))])  # (B, N)
    B, _, H, W = images.shape
    patch_mask = mask.float().reshape(B, 1, H // patch_size, W // patch_size)
    pixel_mask = F.interpolate(patch_mask, (H, W))  # (B, 1, H, W), nearest: 1 on masked patches
    masked = to_display(images)
    masked[pixel_mask[:, 0].bool().cpu().numpy()] = 0.5  # grey
    if mae is None:
        ratio = mask_generator.num_masked / mask.shape[1]
        return image_rows_figure(
            {'original': to_display(images), f'MimCo mask ({ratio:.0%})': masked}
        )
    # MAE's loss is on the masked patches alone: the visible ones are shown as they were.
    pasted = images * (1 - pixel_mask) + prediction.to(images.dtype) * pixel_mask
    return image_rows_figure(
        {
            'original': to_display(images),
            f'masked {mae.mask_ratio:.0%}': masked,
            'reconstruction + visible': to_display(pasted),
        }
    )


def tsne_figure(panels: list):
    """Side-by-side t-SNE maps; `panels`: (title, embedding (N, 2), labels (N,)) each."""
    fig = Figure(figsize=(TSNE_PANEL * len(panels), TSNE_PANEL), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, embedding, labels) in zip(axes[0], panels):
        points = ax.scatter(
            embedding[:, 0], embedding[:, 1], c=labels, cmap='tab10', s=6, vmin=-0.5, vmax=9.5
        )
        ax.set_title(title, fontsize=8)
        ax.set(xticks=[], yticks=[])
    fig.colorbar(points, ax=list(axes[0]), ticks=range(10), fraction=0.02, label='class')
    return fig


def save(fig, path: str) -> None:
    """A PNG of 256 colours (a third of the size of matplotlib's RGBA; the figures have few
    colours)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI)
    rgb = Image.open(buffer).convert('RGB')
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
