"""Where the pre-training JPEGs are decoded (--data_backend); every path draws the same crops, flips
and masks.

- `pil` (default): PIL decodes in the loader workers and the transforms of util/transforms.py run on
  PIL images.
- `torchvision`: `torchvision.io.decode_jpeg` decodes in the workers (libjpeg-turbo: the same pixels
  as PIL's decoder) and the same transforms run on uint8 tensors (bicubic resampling by torch, not
  PIL).
- `nvjpeg` (MimCo, MAE: crop + flip views): the workers only read the file and draw the crop box and
  flip (the draws of `crop_flip_view`, in its order, from each sample's seed); nvJPEG decodes the
  batch on the GPU, where the crops are resized and flipped. Without CUDA it falls back to
  `torchvision`.
Files other than RGB or grey JPEGs (PNG, CMYK JPEG) are decoded by PIL on the CPU in every path.
"""

import io

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from util import data, transforms
from util.errors import InputError

BACKENDS = ('pil', 'torchvision', 'nvjpeg')


def read_bytes(path: str) -> tuple:
    """(the file's bytes as a 1-D uint8 tensor, its header opened lazily by PIL: format, mode and
    size). Raises InputError where PIL cannot read the file."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        header = Image.open(io.BytesIO(raw))
    except OSError as e:
        raise InputError(
            f'{path} is not a readable image ({e}): remove or replace the file'
        ) from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), header


def decodable_jpeg(header: Image.Image) -> bool:
    """Whether torchvision's decode_jpeg and nvJPEG take the file: a JPEG in RGB or grey."""
    return header.format == 'JPEG' and header.mode in ('RGB', 'L')


def load_tensor(path: str):
    """--data_backend torchvision's loader: a (3, H, W) uint8 image decoded by torchvision."""
    encoded, header = read_bytes(path)
    if not decodable_jpeg(header):
        return data.load_image(path)
    try:
        return tv_tensors.Image(decode_jpeg(encoded, mode=ImageReadMode.RGB))
    except RuntimeError as e:
        raise InputError(
            f'{path} is not a readable JPEG ({e}): remove or replace the file'
        ) from None


def load_encoded(path: str) -> tuple:
    """--data_backend nvjpeg's loader: (the JPEG's bytes, its lazily opened header), or (the image
    as a (3, H, W) uint8 tensor, the PIL image) where nvJPEG cannot take the file."""
    encoded, header = read_bytes(path)
    if decodable_jpeg(header):
        return encoded, header
    # The image decoded by PIL takes the header's place: CropFlipParams reads only its size.
    image = data.load_image(path)
    return TF.pil_to_tensor(image), image


class CropFlipParams:
    """The nvjpeg path's part in the loader workers: `crop_flip_view`'s random draws (crop box, then
    flip), in its order, on the image's size read from its header; no decoding."""

    def __init__(self, args):
        # The view's own RandomResizedCrop and RandomHorizontalFlip, so that the settings are its.
        crop, flip = transforms.crop_flip_view(args).transforms[:2]
        self.crop = crop
        self.flip_p = flip.p

    def __call__(self, sample: tuple) -> tuple:
        """(encoded, header) -> (encoded, box (5,): top, left, height, width, flip)."""
        encoded, header = sample
        box = self.crop.make_params([header])
        flip = torch.rand(1) < self.flip_p  # RandomHorizontalFlip flips where rand(1) < p
        params = [box['top'], box['left'], box['height'], box['width'], int(flip)]
        return encoded, torch.tensor(params)


def collate_encoded(batch: list) -> tuple:
    """Samples ((encoded, box), *rest), target -> ((list of encoded, boxes (B, 5)), *rest), targets:
    encoded files differ in length, so they stay a list."""
    encoded = [views[0][0] for views, _ in batch]
    boxes = torch.stack([views[0][1] for views, _ in batch])  # (B, 5)
    # The rest (MimCo's mask) and the targets are collated as by default.
    rest, targets = default_collate([(views[1:], target) for views, target in batch])
    return ((encoded, boxes), *rest), targets


def crop_flip_batch(
    encoded: list, boxes: torch.Tensor, size: int, device: torch.device
) -> torch.Tensor:
    """The crop + flip views (B, 3, size, size), normalised, of a batch of encoded JPEGs (1-D) or
    decoded images (3-D), decoded and cropped on `device` with `crop_flip_view`'s operations.

    `boxes` (B, 5): top, left, height, width and flip of each, as drawn by CropFlipParams.
    """
    images = list(encoded)
    jpegs = [i for i, image in enumerate(encoded) if image.ndim == 1]
    if jpegs:  # one batched call: nvJPEG on CUDA
        decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, decoded):
            images[i] = image  # (3, H, W) uint8
    views = []
    for image, (top, left, height, width, flip) in zip(images, boxes.tolist()):
        # crop_flip_view's RandomResizedCrop, then its flip
        view = TF.resized_crop(
            image.to(device, non_blocking=True),
            top,
            left,
            height,
            width,
            [size, size],
            interpolation=TF.InterpolationMode.BICUBIC,
            antialias=True,
        )
        if flip:
            view = TF.horizontal_flip(view)
        views.append(view)
    views = TF.to_dtype(torch.stack(views), torch.float32, scale=True)  # (B, 3, size, size)
    return transforms.NORMALIZE(views)


class DecodeOnDevice:
    """The nvjpeg path's loader: the workers' batches with their JPEGs decoded, cropped and flipped
    on the device; length and sampler those of the loader it wraps."""

    def __init__(self, loader, size: int, device: torch.device):
        self.loader = loader
        self.size = size
        self.device = device
        self.sampler = loader.sampler  # the training loop sets its epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for ((encoded, boxes), *rest), targets in self.loader:
            yield (crop_flip_batch(encoded, boxes, self.size, self.device), *rest), targets


def resolve_backend(args, device: torch.device) -> str:
    """--data_backend as it will run here: `pil` for sets without files, `torchvision` for nvjpeg
    without CUDA (one printed line each)."""
    backend = args.data_backend
    if backend == 'pil':
        return backend
    if data.dataset_name(args) != 'imagefolder':
        print(
            f'--data_backend {backend} decodes image files: {data.dataset_name(args)} is decoded '
            f'already, using pil'
        )
        return 'pil'
    if backend == 'nvjpeg' and args.method in ('mocov3', 'mtl'):
        raise InputError(
            "--data_backend nvjpeg makes MimCo's and MAE's crop + flip views; MoCo v3's BYOL "
            'views need --data_backend pil or torchvision'
        )
    if backend == 'nvjpeg' and (device.type != 'cuda' or not torch.cuda.is_available()):
        print(
            '--data_backend nvjpeg needs a CUDA device: decoding on the CPU with torchvision '
            'instead'
        )
        return 'torchvision'
    return backend


def build_pretrain_loader(args, dataset, mask_generator, device: torch.device) -> tuple:
    """(dataset, loader) of the pre-training batches of `dataset` (built without a transform),
    decoded as --data_backend says. Raises InputError for nvjpeg with MoCo v3."""
    backend = resolve_backend(args, device)
    if backend == 'nvjpeg':
        return _nvjpeg_loader(args, dataset, mask_generator, device)
    dataset.transform = transforms.pretrain_transform(args, mask_generator)
    if backend == 'torchvision':  # ImageFolder reads each file through its `loader`
        dataset.loader = load_tensor
    return dataset, data.build_loader(dataset, args, is_train=True)


def _nvjpeg_loader(args, dataset, mask_generator, device: torch.device) -> tuple:
    """The workers read the files and draw the crops and flips; the device decodes and crops."""
    dataset.transform = transforms.Views(CropFlipParams(args), mask_generator=mask_generator)
    dataset.loader = load_encoded
    loader = data.build_loader(dataset, args, is_train=True)
    loader.collate_fn = collate_encoded  # read when each epoch's iterator starts
    return dataset, DecodeOnDevice(loader, args.input_size, device)
