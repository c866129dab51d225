"""Data sets, augmentations and loaders.

With no `--data_path` every script uses `digits`: scikit-learn's 1,797 real 8x8 handwritten digits
(10 classes), split train/val with a fixed seed and upsampled to `--input_size`, so that everything
runs on a fresh machine with no download.
"""
import os

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2 as T

from util.dist import get_rank, get_world_size
from util.errors import InputError

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Digits(Dataset):
    """scikit-learn's digits as 3-channel PIL images; a seeded, stratified 80/20 train/val split."""

    def __init__(self, train: bool, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            indices, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
            stratify=digits.target)
        keep = np.sort(train_idx if train else val_idx)
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


def dataset_name(args) -> str:
    if getattr(args, 'dataset', 'auto') != 'auto':
        return args.dataset
    return 'imagefolder' if args.data_path else 'digits'


def build_dataset(args, is_train: bool, transform) -> Dataset:
    name = dataset_name(args)
    if name == 'digits':
        return Digits(train=is_train, transform=transform)
    if not args.data_path:
        raise InputError(f'--dataset {name} needs --data_path (or leave both out to use digits)')
    if name in ('cifar10', 'cifar100'):
        cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
        try:
            return cls(args.data_path, train=is_train, transform=transform,
                       download=getattr(args, 'download', False))
        except RuntimeError as e:
            raise InputError(f'{name} not found in {args.data_path} ({e}); add --download') from None
    if name != 'imagefolder':
        raise InputError(f'unknown --dataset {name!r}: use digits, imagefolder, cifar10 or cifar100')
    root = os.path.join(args.data_path, 'train' if is_train else 'val')
    if not os.path.isdir(root):
        raise InputError(f'data folder {root} does not exist: --data_path must hold train/ and '
                         f'val/ with one sub-folder per class (the ImageNet layout)')
    try:
        dataset = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(f'no images in {root}: {e}') from None
    return dataset


def normalize(args):
    return T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def to_tensor():
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def digits_view(args):
    """Digits are centred strokes: small affine jitter and pixel noise, no crops or flips (a flipped
    2 is no digit)."""
    return T.Compose([
        T.Resize(args.input_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.85, 1.1), shear=5),
        to_tensor(), T.GaussianNoise(sigma=0.05), normalize(args)])


def byol_view(args, blur_p: float, solarize_p: float):
    """One of MoCo v3's two asymmetric BYOL views (Chen et al., 2021, Sec. 4)."""
    return T.Compose([
        T.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomHorizontalFlip(),
        to_tensor(),
        T.RandomSolarize(0.5, p=solarize_p),
        normalize(args)])


def crop_flip_view(args):
    """MimCo/MAE: RandomResizedCrop + flip only."""
    return T.Compose([
        T.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), to_tensor(), normalize(args)])


def eval_transform(args):
    """Resize 256 / centre crop 224 (scaled to --input_size); digits are only upsampled."""
    if dataset_name(args) == 'digits':
        resize = [T.Resize(args.input_size, interpolation=T.InterpolationMode.BICUBIC)]
    else:
        resize = [T.Resize(int(args.input_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                  T.CenterCrop(args.input_size)]
    return T.Compose(resize + [to_tensor(), normalize(args)])


class TwoViews:
    """MoCo v3's input: two independently augmented views of one image."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, image):
        return self.view1(image), self.view2(image)


class ViewWithMask:
    """MimCo's input: one view and its patch mask, made in the loader's workers."""

    def __init__(self, view, mask_generator):
        self.view, self.mask_generator = view, mask_generator

    def __call__(self, image):
        return self.view(image), self.mask_generator()


class OneView:
    def __init__(self, view):
        self.view = view

    def __call__(self, image):
        return (self.view(image),)


def pretrain_transform(args, mask_generator=None):
    """The tuple of tensors one pre-training step takes for `args.method`."""
    digits = dataset_name(args) == 'digits'
    if args.method == 'mocov3':
        if digits:
            return TwoViews(digits_view(args), digits_view(args))
        return TwoViews(byol_view(args, blur_p=1.0, solarize_p=0.0),
                        byol_view(args, blur_p=0.1, solarize_p=0.2))
    view = digits_view(args) if digits else crop_flip_view(args)
    if mask_generator is not None:
        return ViewWithMask(view, mask_generator)
    return OneView(view)


def build_loader(dataset, args, is_train: bool, batch_size: int = None) -> DataLoader:
    """DistributedSampler in every case (one replica without torchrun): its per-epoch shuffle is a
    function of (--seed, epoch) alone, which makes resumed runs exact. Workers are re-made each epoch
    so their seeds come from the (restored) main-process RNG."""
    batch_size = batch_size or args.batch_size
    world_size = get_world_size()
    if is_train and batch_size * world_size > len(dataset):
        raise InputError(f'--batch_size {batch_size} x {world_size} process(es) is larger than the '
                         f'{len(dataset)} training images: lower --batch_size')
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=get_rank(),
                                 shuffle=is_train, seed=args.seed, drop_last=is_train)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=is_train)
