"""The views of the images: each method's training views (digits' jitter, MoCo v3's BYOL views,
MimCo's and MAE's crop + flip, MAE's linear-probe crop) and the eval transform."""

import math
import random

import torch
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from util.data import dataset_name
from util.digits import DigitsJitter
from util.errors import InputError

BICUBIC = T.InterpolationMode.BICUBIC
BILINEAR = T.InterpolationMode.BILINEAR

# The frozen-feature protocols whose official code resizes bilinearly (torchvision's default):
# Layer Grafted's few-shot logistic regression and linear sweep (main_lincls_sweep.py), MoCo v3's
# main_lincls.py. MAE and DINO: bicubic.
BILINEAR_PROTOCOLS = ('logreg', 'lincls_mocov3', 'lincls_grafted')
# MAE's RandomResizedCrop min scale (its main_pretrain.py), also the MAE view of --method mtl.
MAE_CROP_MIN = 0.2


# Stateless: one for every view.
NORMALIZE = T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

# A PIL image or a uint8 (C, H, W) tensor to float32 in [0, 1].
TO_TENSOR = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def digits_view(args) -> T.Compose:
    """Digits are centred strokes: a small affine jitter and pixel noise, no crops or flips (a
    flipped 2 is no digit)."""
    return T.Compose(
        [
            T.Resize(args.input_size, interpolation=BICUBIC),
            *TO_TENSOR,
            DigitsJitter(),
            T.GaussianNoise(sigma=0.05, clip=False),
            NORMALIZE,
        ]
    )


class PILGaussianBlur:
    """SimCLR's Gaussian blur as MoCo v3 draws it (moco-v3 moco/loader.py, GaussianBlur): PIL's
    ImageFilter.GaussianBlur with radius (the standard deviation, in pixels) drawn by Python's
    `random` from [0.1, 2.0]. A uint8 (C, H, W) tensor (--data_backend torchvision) goes through
    PIL and back, losslessly."""

    def __init__(self, sigma: tuple = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        radius = random.uniform(self.sigma[0], self.sigma[1])
        blur = ImageFilter.GaussianBlur(radius=radius)
        if isinstance(image, torch.Tensor):
            return TF.pil_to_tensor(TF.to_pil_image(image).filter(blur))
        return image.filter(blur)


def byol_view(args, blur_p: float, solarize_p: float) -> T.Compose:
    """One of MoCo v3's two asymmetric BYOL views (Chen et al., 2021, Sec. 4), as moco-v3
    main_moco.py's augmentation1/2: torchvision's default bilinear crop, PIL's blur, and the
    solarization (PIL's ImageOps.solarize: pixels >= 128 inverted) before the flip, in the second
    view only (`solarize_p` 0 leaves it out, and with it its random draw)."""
    steps = [
        T.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0), interpolation=BILINEAR),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur()], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=solarize_p))
    steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + TO_TENSOR + [NORMALIZE])


def crop_flip_view(args, interpolation=BICUBIC, crop_min: float = None) -> T.Compose:
    """MimCo/MAE: RandomResizedCrop (min scale `crop_min`, default --crop_min) + flip only
    (MoCo v3's main_lincls.py: bilinear)."""
    if crop_min is None:
        crop_min = args.crop_min
    return T.Compose(
        [
            T.RandomResizedCrop(
                args.input_size, scale=(crop_min, 1.0), interpolation=interpolation
            ),
            T.RandomHorizontalFlip(),
            *TO_TENSOR,
            NORMALIZE,
        ]
    )


class ClippedRandomResizedCrop(T.RandomResizedCrop):
    """MAE's linear-probe crop (mae util/crop.py, after BYOL's TF code): one draw of area and
    aspect ratio, the box then clipped to the image, where torchvision's retries up to 10 times
    and falls back to a centre crop."""

    def make_params(self, flat_inputs: list) -> dict:
        height, width = TF.get_size(flat_inputs[0])  # the image: the only input of the view
        area = height * width
        target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
        log_ratio = self._log_ratio
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        w = min(w, width)
        h = min(h, height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return dict(top=top, left=left, height=h, width=w)


def mae_linprobe_view(args) -> T.Compose:
    """MAE's linear-probe training view (mae main_linprobe.py): its clipping crop, bicubic, and
    a flip."""
    return T.Compose(
        [
            ClippedRandomResizedCrop(
                args.input_size, scale=(args.crop_min, 1.0), interpolation=BICUBIC
            ),
            T.RandomHorizontalFlip(),
            *TO_TENSOR,
            NORMALIZE,
        ]
    )


def eval_interpolation(args) -> T.InterpolationMode:
    """--eval_interpolation, by default the one of the protocol's official code: bilinear for
    BILINEAR_PROTOCOLS, else bicubic (MAE, DINO)."""
    name = getattr(args, 'eval_interpolation', None)
    if name is None:
        name = 'bicubic'
        if getattr(args, 'protocol', None) in BILINEAR_PROTOCOLS:
            name = 'bilinear'
    return T.InterpolationMode(name)


def eval_transform(args) -> T.Compose:
    """Resize and centre crop to --input_size, as MAE's build_transform: resize by 256/224 up to
    224 px (crop_pct 0.875), to the input size itself above it (crop_pct 1.0); digits are only
    upsampled. Interpolation: eval_interpolation."""
    interpolation = eval_interpolation(args)
    if dataset_name(args) == 'digits':
        resize = [T.Resize(args.input_size, interpolation=interpolation)]
    else:
        crop_pct = 1.0
        if args.input_size <= 224:
            crop_pct = 224 / 256
        resize = [
            T.Resize(int(args.input_size / crop_pct), interpolation=interpolation),
            T.CenterCrop(args.input_size),
        ]
    return T.Compose(resize + TO_TENSOR + [NORMALIZE])


class Views:
    """The tuple of tensors one pre-training step takes from an image: each view of it (MoCo v3's
    two, MimCo's and MAE's one, MTL's three), then, for MimCo, its patch mask (MAE, MTL: its mask
    noise), made here in the loader's workers (seeded with the sample's augmentations by
    SeededSamples)."""

    def __init__(self, *views, mask_generator=None):
        self.views = views
        self.mask_generator = mask_generator

    def __call__(self, image) -> tuple:
        views = tuple(view(image) for view in self.views)
        if self.mask_generator is None:
            return views
        return views + (self.mask_generator(),)


def pretrain_transform(args, mask_generator=None) -> Views:
    """The tuple of tensors one pre-training step takes for `args.method`: MTL's are MoCo v3's two
    views, then MAE's minimally augmented one (Layer Grafted, Table 1) and its mask noise."""
    if args.method == 'mocov3':
        return Views(*contrastive_views(args))
    if args.method == 'mtl':
        return Views(
            *contrastive_views(args),
            masked_view(args, crop_min=MAE_CROP_MIN),
            mask_generator=mask_generator,
        )
    return Views(masked_view(args), mask_generator=mask_generator)


def contrastive_views(args) -> tuple:
    """MoCo v3's two views: BYOL's asymmetric pair (the first always blurred, the second sometimes
    solarized), or two digits jitters."""
    if dataset_name(args) == 'digits':
        return digits_view(args), digits_view(args)
    return byol_view(args, blur_p=1.0, solarize_p=0.0), byol_view(args, blur_p=0.1, solarize_p=0.2)


def masked_view(args, crop_min: float = None) -> T.Compose:
    """The view that MimCo and MAE mask: crop + flip, or the digits jitter."""
    if dataset_name(args) == 'digits':
        return digits_view(args)
    return crop_flip_view(args, crop_min=crop_min)


def finetune_view(args):
    """main_finetune.py's training view at --input_size: timm's RandAugment recipe (BEiT, MAE), or
    digits' light jitter."""
    if dataset_name(args) == 'digits':
        return digits_view(args)
    return create_transform(
        args.input_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation='bicubic',
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )


def build_mixup(args, num_classes: int):
    """timm's Mixup/CutMix when either is on (it smooths the labels itself), else None."""
    if args.mixup <= 0 and args.cutmix <= 0 and not args.cutmix_minmax:
        return None
    if args.batch_size % 2:
        raise InputError(
            f'Mixup/CutMix pair images within a batch: --batch_size {args.batch_size} must '
            f'be even (or turn them off with --mixup 0 --cutmix 0)'
        )
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )
