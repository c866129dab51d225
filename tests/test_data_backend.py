"""--data_backend: the torchvision and (GPU-less) nvjpeg decode paths give the pil path's views, and
nvjpeg without CUDA falls back to the CPU in one printed line."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import main_pretrain
import pretrain_setup as pretrain
from tests.conftest import TINY_MAE, epoch_losses, parse
from util import checkpoint, data, decode
from util.errors import InputError
from util.masking import build_mask_generator

TINY = '--method mimco --input_size 16 --batch_size 8 --num_workers 0 --device cpu'.split()


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
    """16 crops of a real photo as quality-90 JPEGs in two classes, plus a PNG and a CMYK JPEG
    (which every path decodes on the CPU)."""
    root = tmp_path_factory.mktemp('jpegs')
    photo = load_sample_image('china.jpg')  # (427, 640, 3) uint8
    for i in range(16):
        folder = root / 'train' / f'class{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        crop = Image.fromarray(photo[7 * i : 7 * i + 45 + 3 * i, 11 * i : 11 * i + 60])
        if i == 3:
            crop.save(folder / f'{i}.png')
        else:
            (crop.convert('CMYK') if i == 5 else crop).save(folder / f'{i}.JPEG', quality=90)
    return str(root)


def first_batch(argv) -> tuple:
    args = parse(TINY + argv)
    pretrain.resolve_args(args)
    mask_generator = build_mask_generator(
        'block', (4, 4), 0.5
    )  # MimCo's: the student's 4 x 4 patch grid
    dataset = data.build_dataset(args, is_train=True, transform=None)
    _, loader = decode.build_pretrain_loader(args, dataset, mask_generator, torch.device('cpu'))
    loader.sampler.set_epoch(3)
    return next(iter(loader))


def test_torchvision_and_nvjpeg_paths_give_the_pil_views(jpeg_folder, monkeypatch):
    """Same seeds, same crop boxes, flips and masks; libjpeg-turbo decodes alike in PIL and
    torchvision, and torch's antialiased bicubic is within a few levels of Pillow's (a shifted crop
    or a missed flip would be tens of levels off). The nvjpeg path's batch code, run on the CPU,
    gives the torchvision path's views exactly."""
    (pil_views, pil_masks), pil_targets = first_batch(['--data_path', jpeg_folder])
    (tv_views, tv_masks), tv_targets = first_batch(
        ['--data_path', jpeg_folder, '--data_backend', 'torchvision']
    )
    assert torch.equal(pil_masks, tv_masks) and torch.equal(pil_targets, tv_targets)
    levels = (pil_views - tv_views).abs() * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    assert levels.mean() < 0.5 and levels.max() <= 8, (levels.mean(), levels.max())
    assert pil_views.std() > 0.3  # real images, not blank crops

    monkeypatch.setattr(decode, 'resolve_backend', lambda args, device: args.data_backend)
    batch = first_batch(['--data_path', jpeg_folder, '--data_backend', 'nvjpeg'])
    (gpu_views, gpu_masks), gpu_targets = batch
    assert torch.equal(gpu_views, tv_views) and torch.equal(gpu_masks, tv_masks)


def test_nvjpeg_without_cuda_falls_back_to_torchvision(jpeg_folder, tmp_path, capsys):
    """On a machine without CUDA (or with --device cpu) a run with --data_backend nvjpeg prints one
    line and trains as --data_backend torchvision does, loss for loss."""
    losses = {}
    for backend in ('torchvision', 'nvjpeg'):
        out = str(tmp_path / backend)
        main_pretrain.main(
            parse(
                TINY
                + TINY_MAE
                + '--epochs 1 --warmup_epochs 0'.split()
                + ['--data_path', jpeg_folder, '--data_backend', backend, '--output_dir', out]
            )
        )
        losses[backend] = epoch_losses(out)
    printed = capsys.readouterr().out
    assert (
        printed.count(
            '--data_backend nvjpeg needs a CUDA device: decoding on the CPU with torchvision'
        )
        == 1
    )
    assert losses['nvjpeg'] == losses['torchvision'] and np.isfinite(losses['nvjpeg']).all()


def test_nvjpeg_refuses_mocov3_views(jpeg_folder, tmp_path):
    with pytest.raises(InputError, match='BYOL views need --data_backend pil or torchvision'):
        main_pretrain.main(
            parse(
                TINY
                + '--method mocov3 --moco_mlp_dim 64 --data_backend nvjpeg'.split()
                + ['--data_path', jpeg_folder, '--output_dir', str(tmp_path)]
            )
        )


@pytest.mark.parametrize('backend', ['torchvision', 'nvjpeg'])
def test_resume_is_exact_with_each_backend(backend, jpeg_folder, tmp_path, monkeypatch):
    """Every path draws its crops and flips from each sample's seed in the loader workers:
    a run resumed after epoch 0 ends with the bits of one that never stopped.
    The nvjpeg path runs its batch code on the CPU here (only nvJPEG's decoding itself needs a GPU),
    its collate function in a worker."""
    monkeypatch.setattr(decode, 'resolve_backend', lambda args, device: args.data_backend)
    argv = TINY + TINY_MAE + '--epochs 2 --warmup_epochs 1 --num_workers 1 --save_freq 1'.split()
    argv += ['--data_path', jpeg_folder, '--data_backend', backend]
    main_pretrain.main(parse(argv + ['--output_dir', str(tmp_path / 'whole')]))
    os.makedirs(tmp_path / 'split')
    shutil.copy(tmp_path / 'whole' / 'checkpoint-0.pth', tmp_path / 'split' / 'checkpoint-last.pth')
    main_pretrain.main(parse(argv + ['--output_dir', str(tmp_path / 'split')]))
    whole, split = (
        checkpoint.load_file(str(tmp_path / run / 'checkpoint-last.pth'))
        for run in ('whole', 'split')
    )
    assert all(torch.equal(whole['model'][k], split['model'][k]) for k in whole['model'])
    assert epoch_losses(tmp_path / 'split') == epoch_losses(tmp_path / 'whole')[1:]
