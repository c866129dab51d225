"""Images/s of the pre-training data path, on JPEGs it writes itself at ImageNet's sizes.

The JPEGs: crops of scikit-learn's two sample photos, resized to 500x375 (one in four 375x500) and saved at
quality 90 in an ImageFolder layout in a temporary folder (or --data_path's train/ images).

Decoders (default): per CPU core (one torch thread, one process, CPU time), the images/s of each way to read a file
and make MimCo's and MAE's view (RandomResizedCrop + flip + to tensor + normalise), each row printed once
measured: the median of --repeats passes and their spread, and the views' mean / max difference to the pil
path's on the same crops, in 0-255 levels. Optional decoders (pillow-simd, simplejpeg, PyTurboJPEG) are
measured where importable; `DCT-scaled` rows decode at the smallest M/8 scale that leaves the crop at least
--input_size pixels. On CUDA, the nvjpeg path's GPU part (img/s of the whole device).
Loader (--table loader): the real training loader (workers, masks, batches) of --data_backend.

python benchmarks/bench_data.py --images 300 --repeats 3
python benchmarks/bench_data.py --table loader --data_backend nvjpeg --num_workers 8 --batch_size 256
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import METHODS, ROOT, device_name, markdown_row, markdown_table  # noqa: E402

sys.path.insert(0, ROOT)
import main_pretrain  # noqa: E402
from util import data, decode, pretrain  # noqa: E402
from util.masking import build_mask_generator  # noqa: E402

HEADER = ['path', 'img/s per core', 'spread', 'Δ vs pil mean / max (levels)', 'note']
COMPARED = 32  # images whose views are compared with the pil path's


def get_args_parser():
    p = argparse.ArgumentParser('mimco data-path benchmark', add_help=False)
    p.add_argument('--table', default='decoders', choices=['decoders', 'loader'],
                   help='decoders: per-core img/s of each decode path; loader: the real training loader')
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root whose train/ to read (default: JPEGs written to a temporary folder)')
    p.add_argument('--images', default=300, type=int, help='JPEGs to write (and to read per pass)')
    p.add_argument('--image_size', default=[500, 375], type=int, nargs=2, help='width height of the JPEGs written')
    p.add_argument('--input_size', default=224, type=int, help='side of the views')
    p.add_argument('--repeats', default=3, type=int, help='timed passes per decoder (median and spread)')
    p.add_argument('--gpu_batch', default=256, type=int, help='images per batch of the GPU path')
    # --table loader
    p.add_argument('--data_backend', default='pil', choices=decode.BACKENDS, help='loader: decode path')
    p.add_argument('--methods', default='mimco,mae', type=str, help='loader: methods whose pre-training input to make')
    p.add_argument('--model', default='vit_small_patch16_224', type=str,
                   help="loader: ViT whose patch grid masks follow")
    p.add_argument('--batch_size', default=64, type=int, help='loader: images per batch')
    p.add_argument('--num_workers', default=2, type=int, help='loader: worker processes')
    p.add_argument('--batches', default=20, type=int, help='loader: batches timed after the first')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='loader: cuda or cpu')
    return p


def write_jpegs(folder: str, count: int, size: tuple) -> list:
    """`count` quality-90 JPEGs of real photo content, 4:2:0, in folder/train/<class>/."""
    from sklearn.datasets import load_sample_image
    photos = [load_sample_image(name) for name in ('china.jpg', 'flower.jpg')]  # (427, 640, 3) each
    rng, paths = np.random.default_rng(0), []
    for i in range(count):
        photo = photos[i % 2]
        width, height = size if i % 4 else size[::-1]  # one in four portrait
        h = int(photo.shape[0] * rng.uniform(0.5, 1.0))
        w = min(photo.shape[1], int(h * width / height))
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize((width, height), Image.BICUBIC)
        os.makedirs(os.path.join(folder, 'train', f'class{i % 10}'), exist_ok=True)
        paths.append(os.path.join(folder, 'train', f'class{i % 10}', f'{i}.JPEG'))
        image.save(paths[-1], quality=90)
    return paths


def pil_build() -> str:
    """Pillow or Pillow-SIMD (a fork installed in Pillow's place), with its version."""
    from importlib import metadata
    with contextlib.suppress(metadata.PackageNotFoundError):
        simd = metadata.distribution('pillow-simd')
        if os.path.dirname(PIL.__file__) == os.path.abspath(simd.locate_file('PIL')):
            return f'Pillow-SIMD {PIL.__version__}'
    return f'Pillow {PIL.__version__}'


def optional_decoders() -> tuple:
    """({name: decode(bytes, scale, height, width) -> (h, w, 3) uint8 at the smallest M/8 scale >= scale},
    {name: why it is not here})."""
    decoders, skipped = {}, {}
    try:
        import simplejpeg

        def simple(raw, need, height, width):  # the smallest output of at least need x the size
            return simplejpeg.decode_jpeg(raw, 'RGB', min_height=int(np.ceil(height * need)),
                                          min_width=int(np.ceil(width * need)))
        decoders['simplejpeg'] = simple
    except ImportError as e:
        skipped['simplejpeg'] = f'not importable ({e}): pip install simplejpeg'
    try:
        import turbojpeg
        jpeg = turbojpeg.TurboJPEG()
        factors = sorted((f for f in jpeg.scaling_factors if f[0] <= f[1]), key=lambda f: f[0] / f[1])

        def turbo(raw, need, height, width):
            factor = next((f for f in factors if f[0] / f[1] >= need), (1, 1))
            return jpeg.decode(raw, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)
        decoders['turbojpeg'] = turbo
    except (ImportError, OSError, RuntimeError) as e:  # the wrapper, or libturbojpeg, missing
        skipped['turbojpeg'] = (f'not usable ({str(e).splitlines()[0]}): pip install PyTurboJPEG, '
                                'apt-get install libturbojpeg0')
    return decoders, skipped


class ExternalView:
    """A view through another decoder: the crop box and flip drawn on the header (as the nvjpeg path's
    workers), the decoder's image (with `scaled`, at the smallest scale that leaves the crop at least
    `size` pixels), then the nvjpeg path's crop, flip and normalisation."""

    def __init__(self, decode_hwc, params, size: int, scaled: bool):
        self.decode_hwc, self.params, self.size, self.scaled = decode_hwc, params, size, scaled
        self.reduced = 0  # images decoded at reduced size

    def __call__(self, path: str) -> torch.Tensor:
        encoded, header = decode.load_encoded(path)
        top, left, height, width, flip = self.params((encoded, header))[1].tolist()
        need = min(1.0, max(self.size / height, self.size / width)) if self.scaled else 1.0
        image = self.decode_hwc(encoded.numpy(), need, header.size[1], header.size[0])  # (h, w, 3)
        fy, fx = image.shape[0] / header.size[1], image.shape[1] / header.size[0]
        self.reduced += fy < 1
        box = torch.tensor([[round(top * fy), round(left * fx), max(1, round(height * fy)),
                             max(1, round(width * fx)), flip]])
        image = torch.from_numpy(image).permute(2, 0, 1)  # (3, h, w)
        return decode.crop_flip_batch([image], box, self.size, torch.device('cpu'))[0]


def time_path(view, paths: list, repeats: int) -> tuple:
    """(images per CPU second of each pass, the first COMPARED views); image i drawn from seed i in every
    pass. CPU time, not wall time: on a machine shared with other jobs it still counts this core's work."""
    rates, kept = [], []
    for repeat in range(repeats):
        start = time.process_time()
        for i, path in enumerate(paths):
            torch.default_generator.manual_seed(i)  # as SeededSamples (torch.manual_seed costs ~0.6 ms)
            out = view(path)
            if repeat == 0 and i < COMPARED:
                kept.append(out)
        rates.append(len(paths) / (time.process_time() - start))
    return rates, kept


def levels_apart(views: list, reference: list) -> str:
    std = torch.tensor(data.normalize(None).std).view(3, 1, 1) * 255
    diff = torch.stack([(a - b).abs() * std for a, b in zip(views, reference)])
    return f'{diff.mean():.2f} / {diff.max():.0f}'


def cpu_paths(args) -> list:
    """(name, view(path), note) of each CPU path; (name, None, why) for those skipped."""
    crop_flip = data.crop_flip_view(args)
    params = decode.CropFlipParams(args)
    paths = [(f'pil ({pil_build()}): decode + crop + flip', lambda p: crop_flip(data.load_image(p)),
              '--data_backend pil'),
             ('pil: decode only', data.load_image, ''),
             ('torchvision.io.decode_jpeg: decode + crop + flip', lambda p: crop_flip(decode.load_tensor(p)),
              '--data_backend torchvision'),
             ('torchvision.io.decode_jpeg: decode only', decode.load_tensor, ''),
             ('nvjpeg path, worker part: read + header + crop box', lambda p: params(decode.load_encoded(p)),
              "the GPU path's CPU cost")]
    if 'SIMD' not in pil_build():
        paths.append(('pillow-simd', None, 'not the PIL here (it replaces Pillow): run this in a venv with it'))
    decoders, skipped = optional_decoders()
    for name, decode_hwc in decoders.items():
        for scaled in (False, True):
            view = ExternalView(decode_hwc, params, args.input_size, scaled)
            paths.append((f'{name}{", DCT-scaled" if scaled else ""}: decode + crop + flip', view, ''))
    paths += [(name, None, why) for name, why in skipped.items()]
    return paths


def gpu_row(args, paths: list, reference: list) -> list:
    """The nvjpeg path's GPU part: batched nvJPEG decode, crop, flip, normalise, on pre-read files."""
    device = torch.device('cuda')
    params = decode.CropFlipParams(args)
    samples = []
    for i, path in enumerate(paths):
        torch.default_generator.manual_seed(i)
        samples.append(params(decode.load_encoded(path)))
    batches = [samples[i:i + args.gpu_batch] for i in range(0, len(samples), args.gpu_batch)]

    def run(batch):
        boxes = torch.stack([s[1] for s in batch])
        return decode.crop_flip_batch([s[0] for s in batch], boxes, args.input_size, device)
    views = run(batches[0])[:COMPARED].cpu()  # warm-up
    rates = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        torch.cuda.synchronize()
        rates.append(len(samples) / (time.perf_counter() - start))
    return row(f'nvjpeg (GPU, batch {args.gpu_batch}): decode + crop + flip', rates,
               levels_apart(list(views), reference), f'{torch.cuda.get_device_name()}: img/s of the device')


def row(name: str, rates: list, apart: str, note: str) -> list:
    median = statistics.median(rates)
    spread = f'±{50 * (max(rates) - min(rates)) / median:.0f} % ({len(rates)} runs)'  # half the range
    return [name, f'{median:,.0f}', spread, apart, note]


def decoder_table(args, paths: list) -> list:
    torch.set_num_threads(1)
    source = args.data_path or f'{args.image_size[0]}x{args.image_size[1]}, quality 90'
    print(f'{len(paths)} JPEGs ({source}); views {args.input_size} px, crop scale >= {args.crop_min}; '
          f'{device_name(torch.device("cpu"))}; load average {os.getloadavg()[0]:.1f}; '
          f'img/s per core: images per second of this process\'s CPU time\n')
    print(markdown_table(HEADER, []), flush=True)
    rows, reference = [], None
    for name, view, note in cpu_paths(args):
        if view is None:
            rows.append([name, '', '', '', f'skipped: {note}'])
        else:
            rates, views = time_path(view, paths, args.repeats)
            reference = reference or views
            is_view = isinstance(views[0], torch.Tensor) and views[0].dtype == torch.float32
            apart = levels_apart(views, reference) if is_view else ''
            if getattr(view, 'scaled', False):
                note = f'{100 * view.reduced / (len(paths) * args.repeats):.0f} % of crops decoded at reduced size'
            rows.append(row(name, rates, apart, note))
        print(markdown_row(rows[-1]), flush=True)
    if torch.cuda.is_available():
        rows.append(gpu_row(args, paths, reference))
    else:
        rows.append(['nvjpeg (GPU)', '', '', '', 'skipped: no CUDA device'])
    print(markdown_row(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- the real loader

def loader_args(bench, method: str, data_path: str):
    argv = ['--method', method, '--model', bench.model, '--batch_size', str(bench.batch_size),
            '--num_workers', str(bench.num_workers), '--device', bench.device, '--output_dir', '',
            '--input_size', str(bench.input_size), '--data_path', data_path, '--data_backend', bench.data_backend]
    args = main_pretrain.get_args_parser().parse_args(argv)
    pretrain.resolve_defaults(args)
    return args


def measure_loader(args, batches: int) -> dict:
    """Seconds to the first batch, then images/s over `batches` more (epochs restart as in training)."""
    mask_generator = None
    if args.method == 'mimco':  # as build_model: the masks follow the student's patch grid
        grid = pretrain.create_vit(args).patch_embed.grid_size
        mask_generator = build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = data.build_dataset(args, is_train=True, transform=None)
    dataset, loader = decode.build_pretrain_loader(args, dataset, mask_generator, torch.device(args.device))
    start, first, seen, epoch = time.perf_counter(), None, 0, 0
    while seen < batches:
        loader.sampler.set_epoch(epoch)
        for inputs, _ in loader:
            if first is None:
                first, timed_from = time.perf_counter() - start, time.perf_counter()
                continue
            seen += 1
            if seen == batches:
                break
        epoch += 1
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - timed_from
    return {'first_s': first, 'img_s': batches * args.batch_size / elapsed, 'images': len(dataset)}


def loader_table(bench, data_path: str) -> list:
    methods = [m.strip() for m in bench.methods.split(',') if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f'error: --methods {bench.methods!r}: choose from {", ".join(METHODS)}')
    header = ['method', 'data backend', 'images', 'size', 'batch', 'workers', 'batches timed', 'img/s', 'first batch s']
    print(f'device: {device_name(torch.device(bench.device))}\n\n{markdown_table(header, [])}', flush=True)
    rows = []
    for method in methods:
        args = loader_args(bench, method, data_path)
        with contextlib.redirect_stdout(io.StringIO()):  # the loader's own lines, e.g. a fallback
            backend = decode.resolve_backend(args, torch.device(args.device))
            result = measure_loader(args, bench.batches)
        rows.append([method, backend, result['images'], args.input_size, args.batch_size, args.num_workers,
                     bench.batches, f'{result["img_s"]:.0f}', f'{result["first_s"]:.2f}'])
        print(markdown_row(rows[-1]), flush=True)
    return rows


def main(bench) -> list:
    with tempfile.TemporaryDirectory() as folder:
        if bench.data_path:
            root = os.path.join(bench.data_path, 'train')
            paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)[:bench.images]
        else:
            paths = write_jpegs(folder, bench.images, tuple(bench.image_size))
        if bench.table == 'loader':
            return loader_table(bench, bench.data_path or folder)
        bench.crop_min = pretrain.METHOD_DEFAULTS['mimco']['crop_min']  # MimCo's and MAE's views
        return decoder_table(bench, paths)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco data-path benchmark', parents=[get_args_parser()])
    main(parser.parse_args())
