"""Images/s of the pre-training data loader alone: `util.data.build_loader` over the real pre-training
transform of each method (two BYOL views for mocov3, crop + flip and a block mask for mimco, ...).

Compare with bench_step.py's img/s: the loader must be faster than the step it feeds.

Built-in digits:  python benchmarks/bench_data.py
ImageNet:         python benchmarks/bench_data.py --data_path /data/imagenet --input_size 224 \
                      --batch_size 256 --num_workers 10 --batches 100
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import METHODS, ROOT, device_name, markdown_table  # noqa: E402

sys.path.insert(0, ROOT)
import main_pretrain  # noqa: E402
from util import pretrain  # noqa: E402
from util import data  # noqa: E402
from util.masking import build_mask_generator  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('mimco data-loader benchmark', add_help=False)
    p.add_argument('--methods', default=','.join(METHODS), type=str,
                   help='comma-separated methods whose pre-training transform to run (mimco, mae, mocov3)')
    p.add_argument('--model', default='vit_digits_patch4_16', type=str,
                   help="timm ViT whose input size and patch grid the transform and masks follow")
    p.add_argument('--input_size', default=None, type=int, help="image size (default: the model's)")
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root with train/ (default: none, the built-in digits)')
    p.add_argument('--batch_size', default=128, type=int, help='images per batch')
    p.add_argument('--num_workers', default=4, type=int, help='loader worker processes')
    p.add_argument('--batches', default=50, type=int,
                   help='batches timed after the first (the first one pays for starting the workers)')
    return p


def loader_args(bench, method: str):
    argv = ['--method', method, '--model', bench.model, '--batch_size', str(bench.batch_size),
            '--num_workers', str(bench.num_workers), '--device', 'cpu', '--output_dir', '']
    argv += ['--input_size', str(bench.input_size)] if bench.input_size else []
    argv += ['--data_path', bench.data_path] if bench.data_path else []
    args = main_pretrain.get_args_parser().parse_args(argv)
    pretrain.resolve_defaults(args)
    return args


def measure_loader(args, batches: int) -> dict:
    """Seconds to the first batch, then images/s over `batches` more (epochs restart as in training)."""
    mask_generator = None
    if args.method == 'mimco':  # as build_model: the masks follow the student's patch grid
        grid = pretrain.create_vit(args).patch_embed.grid_size
        mask_generator = build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = data.build_dataset(args, is_train=True,
                                 transform=data.pretrain_transform(args, mask_generator))
    loader = data.build_loader(dataset, args, is_train=True)
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
    elapsed = time.perf_counter() - timed_from
    return {'first_s': first, 'img_s': batches * args.batch_size / elapsed, 'images': len(dataset)}


def main(bench) -> str:
    methods = [m.strip() for m in bench.methods.split(',') if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f'error: --methods {bench.methods!r}: choose from {", ".join(METHODS)}')
    rows = []
    for method in methods:
        args = loader_args(bench, method)
        result = measure_loader(args, bench.batches)
        rows.append([method, data.dataset_name(args), result['images'], args.input_size, args.batch_size,
                     args.num_workers, bench.batches, f'{result["img_s"]:.0f}', f'{result["first_s"]:.2f}'])
    table = markdown_table(['method', 'data', 'images', 'size', 'batch', 'workers', 'batches timed',
                            'img/s', 'first batch s'], rows)
    print(f'device: {device_name(torch.device("cpu"))}\n')
    print(table)
    return table


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco data-loader benchmark', parents=[get_args_parser()])
    main(parser.parse_args())
