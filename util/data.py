"""Data sets, augmentations and loaders (the built-in digits: util/digits.py)."""

import os
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision import datasets

from util.digits import Digits
from util.dist import all_gather, get_rank, get_world_size
from util.errors import InputError


def load_image(path: str) -> Image.Image:
    """8-bit RGB. PIL's convert('RGB') clips wider samples to 0..255 (a 16-bit scan turns white):
    16-bit grayscale ('I;16*', or 'I' as older Pillow reads it) keeps its top 8 bits instead."""
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            image.load()
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise InputError(
            f'{path} is not a readable image ({e}): remove or replace the file'
        ) from None
    if not (image.mode.startswith('I') or image.mode == 'F'):
        return image.convert('RGB')
    pixels = np.asarray(image)
    if image.mode == 'F' or pixels.min() < 0 or pixels.max() > 65535:
        raise InputError(
            f'{path} has {image.mode} pixels that are not 16-bit integers (range '
            f'{pixels.min():g}..{pixels.max():g}), which have no one 8-bit scale: '
            f'convert it to an 8- or 16-bit PNG'
        )
    return Image.fromarray((pixels.astype(np.int64) >> 8).astype(np.uint8)).convert('RGB')


def dataset_name(args) -> str:
    """--dataset, with `auto` resolved: imagefolder with --data_path, digits without."""
    if getattr(args, 'dataset', 'auto') != 'auto':
        return args.dataset
    if args.data_path:
        return 'imagefolder'
    return 'digits'


LAYOUT = '--data_path must hold train/ and val/ with one sub-folder per class (the ImageNet layout)'


def build_dataset(args, is_train: bool, transform) -> Dataset:
    """digits (no --data_path), CIFAR-10/100, or the ImageFolder train/ or val/ of --data_path.

    Samples are (transform(image), class index). Raises InputError for a missing or empty folder.
    """
    name = dataset_name(args)
    if name == 'digits':
        return Digits(train=is_train, transform=transform)
    if not args.data_path:
        raise InputError(f'--dataset {name} needs --data_path (or leave both out to use digits)')
    if name in ('cifar10', 'cifar100'):
        return _cifar(name, args, is_train, transform)
    return _image_folder(args.data_path, is_train, transform)


def _cifar(name: str, args, is_train: bool, transform) -> Dataset:
    """torchvision's CIFAR-10 or CIFAR-100 in --data_path (downloaded there with --download)."""
    cifar = {'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100}[name]
    try:
        return cifar(
            args.data_path,
            train=is_train,
            transform=transform,
            download=getattr(args, 'download', False),
        )
    except RuntimeError as e:
        raise InputError(f'{name} not found in {args.data_path} ({e}); add --download') from None


def _image_folder(data_path: str, is_train: bool, transform) -> Dataset:
    """data_path/train (its own class indices) or data_path/val (train/'s, ValImageFolder)."""
    train_root = os.path.join(data_path, 'train')
    if is_train:
        root = train_root
    else:
        root = os.path.join(data_path, 'val')
    if not os.path.isdir(root):
        raise InputError(f'data folder {root} does not exist: {LAYOUT}')
    try:
        if is_train:
            return TrainImageFolder(root, transform=transform, loader=load_image)
        # An empty val/ is allowed here to be refused below with the layout it needs.
        dataset = ValImageFolder(
            root, train_root, transform=transform, loader=load_image, allow_empty=True
        )
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(f'no images in {root}: {e}') from None
    if not dataset.samples:
        raise InputError(f'no images in {root}: {LAYOUT}')
    return dataset


def find_classes(directory: str, say_skipped: bool = True) -> tuple:
    """torchvision's find_classes (sorted class folders, their indices) without hidden folders:
    `.ipynb_checkpoints`, `.git` or `.Trash` are no classes. The skipped ones are printed once."""
    folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    hidden = [name for name in folders if name.startswith('.')]
    classes = [name for name in folders if not name.startswith('.')]
    if hidden and say_skipped:
        print(
            f'{directory}: skipped {len(hidden)} hidden folder(s), no classes: {", ".join(hidden)}'
        )
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {name: index for index, name in enumerate(classes)}


class TrainImageFolder(datasets.ImageFolder):
    """train/: torchvision's ImageFolder without hidden folders (find_classes)."""

    def find_classes(self, directory: str) -> tuple:
        return find_classes(directory)


class ValImageFolder(datasets.ImageFolder):
    """val/ labelled by train/'s class indices (its own, sorted, would shift when val/ lacks a class
    or has one more). A class that train/ lacks is refused: its images have no label to be scored
    against. A class that val/ lacks is fine: accuracy is over the classes val/ has."""

    def __init__(self, root: str, train_root: str, **kwargs):
        self.train_root = train_root
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple:
        # train/'s hidden folders were said when train/ was read.
        classes, class_to_idx = find_classes(self.train_root, say_skipped=False)
        val_classes = find_classes(directory)[0]
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            shown = ', '.join(unknown[:5])
            if len(unknown) > 5:
                shown += ' ...'
            raise InputError(
                f'{directory} has class folders that {self.train_root} has not ({shown}): its '
                f'images have no label to be scored against; remove them or add them to train/'
            )
        missing = len(classes) - len(val_classes)
        if missing:
            print(
                f'{directory} lacks {missing} of the {len(classes)} classes of train/: scored over '
                f"the {len(val_classes)} it has, with train/'s labels"
            )
        return classes, class_to_idx


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields (epoch, index) pairs, so each sample can know its epoch."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


class SeededSamples(Dataset):
    """Draws each sample's augmentation (and mask) from its own seed, a function of (--seed, epoch,
    index) alone: the same images whatever the number of workers or processes, and after a resume.
    The caller's RNG states are left as they were."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key  # from EpochSampler
        # Within a run, seeds differ while epoch < 1,000,003 and index < 10,000,019 (both prime).
        seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
        # A loader worker's own streams need no restoring; the main process's do.
        main_process = get_worker_info() is None
        torch_state = torch.default_generator.get_state()
        python_state = random.getstate()
        if main_process:
            numpy_state = np.random.get_state()
        # torch.manual_seed would also visit every accelerator (~0.2 ms); the CPU generator is what
        # transforms draw from.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            torch.default_generator.set_state(torch_state)
            random.setstate(python_state)
            if main_process:
                np.random.set_state(numpy_state)


def build_loader(
    dataset, args, is_train: bool, batch_size: int = None, random_samples: bool = True
) -> DataLoader:
    """A DataLoader of `dataset` with `batch_size` (default --batch_size) images per process.

    Training: a DistributedSampler (one replica without torchrun) shuffled by (--seed, epoch) alone;
    samples seeded one by one (SeededSamples), so resumed runs are exact and workers can persist;
    `random_samples=False` (fixed tensors, e.g. cached features) skips that seeding, which would
    cost more than the sample. Evaluation: rank r takes images r, r + W, ... (gather_shards restores
    the order). Raises InputError where one training batch would need more images than there are.
    """
    batch_size = batch_size or args.batch_size
    world_size = get_world_size()
    if is_train and batch_size * world_size > len(dataset):
        raise InputError(
            f'--batch_size {batch_size} x {world_size} process(es) is larger than the '
            f'{len(dataset)} training images: lower --batch_size'
        )
    if is_train:
        sampler = _train_sampler(dataset, world_size, args.seed, random_samples)
        if random_samples:
            dataset = SeededSamples(dataset, args.seed)
    else:  # each image once: DistributedSampler would pad the last ranks with repeats
        sampler = range(get_rank(), len(dataset), world_size)
    # Workers' base seeds come from `generator`: from the global stream, that draw would move in a
    # resumed run (persistent workers start once per run) and shift the drop path drawn after it.
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=is_train,
        persistent_workers=is_train and args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed + get_rank()),
    )


def _train_sampler(dataset, world_size: int, seed: int, random_samples: bool) -> DistributedSampler:
    """This rank's share of each epoch's shuffle; with `random_samples`, (epoch, index) pairs."""
    if random_samples:
        sampler_class = EpochSampler
    else:
        sampler_class = DistributedSampler
    return sampler_class(
        dataset, num_replicas=world_size, rank=get_rank(), shuffle=True, seed=seed, drop_last=True
    )


def gather_shards(x: torch.Tensor, n: int) -> torch.Tensor:
    """The rows (n, ...) of every rank's evaluation shard `x`, in sample order, on every rank.

    A shard of build_loader(is_train=False) holds samples rank, rank + W, ...: padded to one length
    for all_gather, interleaved, the padding falls past the n-th row.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x
    rows = -(-n // world_size)  # ceil(n / W): the length of rank 0's shard, the longest
    x = torch.cat([x, x.new_zeros(rows - len(x), *x.shape[1:])])  # (rows, ...)
    gathered = all_gather(x, keep_local_grad=False).view(world_size, rows, *x.shape[1:])
    # Row j of rank r is sample j * W + r: rank-major to sample order.
    return gathered.transpose(0, 1).reshape(world_size * rows, *x.shape[1:])[:n]


def add_data_args(p, subsets: bool = True) -> None:
    """The data flags of every script, and (`subsets`) the evaluations' flags: the labelled subset
    and the eval resize."""
    p.add_argument(
        '--data_path',
        default=None,
        type=str,
        help='ImageFolder root with train/ (and val/ to evaluate; default: none, the built-in '
        'digits)',
    )
    p.add_argument(
        '--dataset',
        default='auto',
        choices=['auto', 'digits', 'imagefolder', 'cifar10', 'cifar100'],
        help='auto: imagefolder with --data_path, digits without',
    )
    p.add_argument('--download', action='store_true', help='download CIFAR into --data_path')
    if not subsets:
        return
    p.add_argument(
        '--subset_file',
        default=None,
        type=str,
        help="labelled subset as SimCLR's 1percent.txt / 10percent.txt: one training file name a "
        'line (<wnid>_<id>.JPEG); digits and CIFAR samples are named <dataset>_<index>',
    )
    p.add_argument(
        '--train_fraction',
        default=None,
        type=float,
        help='keep this fraction of each class of the training set (e.g. 0.01, 0.1), seeded by '
        '--seed',
    )
    p.add_argument(
        '--eval_interpolation',
        default=None,
        choices=['bicubic', 'bilinear'],
        help='resize of the evaluated images (default: bilinear for --protocol logreg, as Layer '
        "Grafted's code; else bicubic, as MAE's and DINO's)",
    )
    p.add_argument(
        '--shots_per_class',
        default=None,
        type=int,
        help='keep this many training images per class, seeded by --seed',
    )
    p.add_argument(
        '--subset_draws',
        default=None,
        type=int,
        help='seeded draws of the --train_fraction / --shots_per_class subset, each evaluated, '
        'then mean and sample std (default: 10 on digits, else 1; logreg and fine-tuning)',
    )
    p.add_argument(
        '--subset_draw_index',
        default=0,
        type=int,
        help='the first draw: draw k is seeded by --seed + 1000003 k (0: the --seed draw)',
    )
