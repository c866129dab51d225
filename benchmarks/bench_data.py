"""Images/s of the pre-training data path, on JPEGs it writes itself at ImageNet's sizes: crops of
scikit-learn's two sample photos at 500x375 (one in four 375x500), quality 90, in a temporary
ImageFolder (or --data_path's train/).
Decoders (default): per CPU core (one torch thread, CPU time), the images/s of each way to read a
file and make MimCo's and MAE's view (RandomResizedCrop + flip + to tensor + normalise): the median
of --repeats passes, their spread, and the views' mean / max difference to the pil path's on the
same crops, in 0-255 levels; on CUDA, the nvjpeg path's GPU part (img/s of the device).
Loader (--table loader): the real training loader of --data_backend. Rows print as measured.
python -m benchmarks.bench_data --images 300 --repeats 3
python -m benchmarks.bench_data --table loader --data_backend nvjpeg --num_workers 8 \
    --batch_size 256"""

import argparse
import contextlib
import io
import itertools
import os
import statistics
import tempfile
import time

import numpy as np
import PIL
import torch
from PIL import Image

import pretrain_setup
from benchmarks.bench_step import markdown_row, method_list, pretrain_args
from benchmarks.timing import device_name, timed
from util import data, decode, transforms
from util.masking import build_mask_generator

COMPARED = 32  # images whose views are compared with the pil path's


def get_args_parser():
    p = argparse.ArgumentParser('mimco data-path benchmark', add_help=False)
    p.add_argument(
        '--table',
        default='decoders',
        choices=['decoders', 'loader'],
        help='decode paths, or the loader',
    )
    p.add_argument(
        '--data_path',
        default=None,
        type=str,
        help='ImageFolder root to read train/ of (default: JPEGs)',
    )
    p.add_argument('--images', default=300, type=int, help='JPEGs to write (and to read per pass)')
    p.add_argument(
        '--image_size',
        default=[500, 375],
        type=int,
        nargs=2,
        help='width height of the JPEGs written',
    )
    p.add_argument('--input_size', default=224, type=int, help='side of the views')
    p.add_argument(
        '--repeats', default=3, type=int, help='timed passes per decoder (median and spread)'
    )
    p.add_argument('--gpu_batch', default=256, type=int, help='images per batch of the GPU path')
    p.add_argument(
        '--data_backend', default='pil', choices=decode.BACKENDS, help='loader: decode path'
    )
    p.add_argument(
        '--methods',
        default='mimco,mae',
        type=method_list,
        help='loader: methods whose input to make',
    )
    p.add_argument(
        '--model',
        default='vit_small_patch16_224',
        type=str,
        help='loader: the ViT whose grid masks follow',
    )
    p.add_argument('--batch_size', default=64, type=int, help='loader: images per batch')
    p.add_argument('--num_workers', default=2, type=int, help='loader: worker processes')
    p.add_argument('--batches', default=20, type=int, help='loader: batches timed after the first')
    p.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        help='loader: cuda or cpu',
    )
    # What transforms.crop_flip_view and decode.CropFlipParams read besides the flags above: the
    # crop scale of MimCo's and MAE's views.
    p.set_defaults(crop_min=pretrain_setup.METHOD_DEFAULTS['mimco']['crop_min'])
    return p


def write_jpegs(folder: str, count: int, size: tuple) -> list:
    """`count` quality-90 JPEGs of real photo content, 4:2:0, in folder/train/<class>/."""
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in ('china.jpg', 'flower.jpg')]  # (427, 640, 3) each
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % 2]
        width, height = size
        if i % 4 == 0:  # one in four portrait
            width, height = size[::-1]
        # A random crop of at least half the photo's height, at the image's aspect ratio.
        h = int(photo.shape[0] * rng.uniform(0.5, 1.0))
        w = min(photo.shape[1], int(h * width / height))
        top = rng.integers(0, photo.shape[0] - h + 1)
        left = rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[top : top + h, left : left + w]
        image = Image.fromarray(crop).resize((width, height), Image.BICUBIC)
        class_folder = os.path.join(folder, 'train', f'class{i % 10}')
        os.makedirs(class_folder, exist_ok=True)
        paths.append(os.path.join(class_folder, f'{i}.JPEG'))
        image.save(paths[-1], quality=90)
    return paths


def time_path(view, paths: list, repeats: int, keep: int = COMPARED) -> tuple:
    """(images per CPU second of each pass, the first `keep` views); image i drawn from seed i in
    every pass. CPU time, not wall time: on a machine shared with other jobs it still counts this
    core's work."""
    rates = []
    kept = []
    for repeat in range(repeats):
        start = time.process_time()
        for i, path in enumerate(paths):
            # Seeded as SeededSamples seeds a sample (torch.manual_seed costs ~0.6 ms).
            torch.default_generator.manual_seed(i)
            out = view(path)
            if repeat == 0 and i < keep:
                kept.append(out)
        rates.append(len(paths) / (time.process_time() - start))
    return rates, kept


def levels_apart(views: list, reference: list) -> str:
    """'mean / max' absolute difference of normalised views to the reference's, in 0-255 levels."""
    std = torch.tensor(transforms.NORMALIZE.std).view(3, 1, 1) * 255
    diff = torch.stack([(a - b).abs() * std for a, b in zip(views, reference)])
    return f'{diff.mean():.2f} / {diff.max():.0f}'


def row(name: str, rates: list, apart: str, note: str) -> list:
    """A decoder table row: the median img/s and the spread of the passes around it, in %."""
    median = statistics.median(rates)
    half_range = (max(rates) - min(rates)) / 2
    return [
        name,
        f'{median:,.0f}',
        f'±{100 * half_range / median:.0f} % ({len(rates)} runs)',
        apart,
        note,
    ]


def cpu_paths(args) -> list:
    """(name, view(path), note) of each CPU path."""
    crop_flip = transforms.crop_flip_view(args)
    params = decode.CropFlipParams(args)
    return [
        (
            f'pil (Pillow {PIL.__version__}): decode + crop + flip',
            lambda p: crop_flip(data.load_image(p)),
            '--data_backend pil',
        ),
        ('pil: decode only', data.load_image, ''),
        (
            'torchvision.io.decode_jpeg: decode + crop + flip',
            lambda p: crop_flip(decode.load_tensor(p)),
            '--data_backend torchvision',
        ),
        ('torchvision.io.decode_jpeg: decode only', decode.load_tensor, ''),
        (
            'nvjpeg path, worker part: read + header + crop box',
            lambda p: params(decode.load_encoded(p)),
            "the GPU path's CPU cost",
        ),
    ]


def gpu_row(args, paths: list, reference: list) -> list:
    """The nvjpeg path's GPU part: batched nvJPEG decode, crop, flip, normalise, on files read
    beforehand."""
    params = decode.CropFlipParams(args)
    cuda = torch.device('cuda')
    # The workers' part of every image, seeded as in the worker row: (encoded, crop box) each.
    _, samples = time_path(
        lambda path: params(decode.load_encoded(path)), paths, 1, keep=len(paths)
    )
    batches = [samples[i : i + args.gpu_batch] for i in range(0, len(samples), args.gpu_batch)]

    def run(batch):
        encoded = [sample[0] for sample in batch]
        boxes = torch.stack([sample[1] for sample in batch])
        return decode.crop_flip_batch(encoded, boxes, args.input_size, cuda)

    def passes(n):
        for _ in range(n):
            for batch in batches:
                run(batch)

    views = run(batches[0])[:COMPARED].cpu()  # also the warm-up
    rates = []
    for _ in range(args.repeats):
        ms = timed(passes, cuda, 1, 0, None)['ms']
        rates.append(len(samples) * 1000 / ms)
    return row(
        f'nvjpeg (GPU, batch {args.gpu_batch}): decode + crop + flip',
        rates,
        levels_apart(list(views), reference),
        f'{torch.cuda.get_device_name()}: img/s of the device',
    )


def decoder_table(args, paths: list) -> list:
    """Each CPU path's row, then the GPU path's (skipped without CUDA); printed as measured."""
    torch.set_num_threads(1)
    source = args.data_path or f'{args.image_size[0]}x{args.image_size[1]}, quality 90'
    view_size = f'views {args.input_size} px, crop scale >= {args.crop_min}'
    print(
        f'{len(paths)} JPEGs ({source}); {view_size}; '
        f'{device_name(torch.device("cpu"))}; load average {os.getloadavg()[0]:.1f}; '
        f"img/s per core: images per second of this process's CPU time\n"
    )
    header = ['path', 'img/s per core', 'spread', 'Δ vs pil mean / max (levels)', 'note']
    print(markdown_row(header, header=True), flush=True)
    rows = []
    reference = None
    for name, view, note in cpu_paths(args):
        rates, views = time_path(view, paths, args.repeats)
        # The first path's (pil's) views are what the others are compared with.
        reference = reference or views
        # Decode-only paths give images, not normalised views: nothing to compare.
        is_view = isinstance(views[0], torch.Tensor) and views[0].dtype == torch.float32
        apart = ''
        if is_view:
            apart = levels_apart(views, reference)
        rows.append(row(name, rates, apart, note))
        print(markdown_row(rows[-1]), flush=True)
    if torch.cuda.is_available():
        rows.append(gpu_row(args, paths, reference))
    else:
        rows.append(['nvjpeg (GPU)', '', '', '', 'skipped: no CUDA device'])
    print(markdown_row(rows[-1]), flush=True)
    return rows


def measure_loader(args, batches: int) -> dict:
    """Seconds to the first batch, then images/s over `batches` more (epochs restart as in
    training), and the images the loader reads."""
    # As build_model: MimCo's masks follow the student's patch grid.
    grid = pretrain_setup.create_vit(args).patch_embed.grid_size
    mask_generator = None
    if args.method == 'mimco':
        mask_generator = build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = data.build_dataset(args, is_train=True, transform=None)
    dataset, loader = decode.build_pretrain_loader(
        args, dataset, mask_generator, torch.device(args.device)
    )

    def epochs():  # restarted as in training
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    stream = epochs()

    def draw(n):
        for _ in range(n):
            next(stream)

    # The one warm-up step is the first batch: worker start-up and the first files.
    seconds = timed(draw, torch.device(args.device), batches, 1, None)
    return {
        'first_s': seconds['warmup_s'],
        'img_s': args.batch_size * 1000 / seconds['ms'],
        'images': len(dataset),
    }


def loader_table(bench, data_path: str) -> list:
    """One row per method: the real training loader of --data_backend over the JPEGs."""
    header = [
        'method',
        'data backend',
        'images',
        'size',
        'batch',
        'workers',
        'batches timed',
        'img/s',
        'first batch s',
    ]
    print(
        f'device: {device_name(torch.device(bench.device))}\n\n{markdown_row(header, header=True)}',
        flush=True,
    )
    rows = []
    for method in bench.methods:
        flags = ['--num_workers', str(bench.num_workers), '--input_size', str(bench.input_size)]
        flags += ['--data_path', data_path, '--data_backend', bench.data_backend]
        args = pretrain_args(bench, method, *flags)
        with contextlib.redirect_stdout(io.StringIO()):  # the loader's own lines, e.g. a fallback
            backend = decode.resolve_backend(args, torch.device(args.device))
            result = measure_loader(args, bench.batches)
        rows.append(
            [
                method,
                backend,
                result['images'],
                args.input_size,
                args.batch_size,
                args.num_workers,
                bench.batches,
                f'{result["img_s"]:.0f}',
                f'{result["first_s"]:.2f}',
            ]
        )
        print(markdown_row(rows[-1]), flush=True)
    return rows


def listed_files(data_path: str, count: int) -> list:
    """The first `count` files of data_path/train/, in sorted order."""
    root = os.path.join(data_path, 'train')
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    return paths[:count]


def main(bench) -> list:
    with tempfile.TemporaryDirectory() as folder:
        if bench.data_path:
            paths = listed_files(bench.data_path, bench.images)
        else:
            paths = write_jpegs(folder, bench.images, tuple(bench.image_size))
        if bench.table == 'loader':
            return loader_table(bench, bench.data_path or folder)
        return decoder_table(bench, paths)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco data-path benchmark', parents=[get_args_parser()])
    main(parser.parse_args())
