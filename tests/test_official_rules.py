"""Issue 24's second fidelity round: each rule against an independent expression of the official
code's (moco-v3 main_moco.py and moco/loader.py, mae util/crop.py and util/datasets.py, dino
vision_transformer.py, Layer Grafted's main_finetune_mae.py and main_lincls_sweep.py), written
here from those files, never from ours."""

import argparse
import math
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as v1
from PIL import Image, ImageFilter, ImageOps
from sklearn.datasets import load_sample_image
from test_checkpoint import tiny_vit
from test_data_backend import first_batch, jpeg_folder  # noqa: F401  (jpeg_folder: a fixture)
from test_eval import official_mocov3
from test_tools import ROOT, script_commands
from torchvision.transforms import v2 as T

import main_finetune
import main_linprobe
import pretrain_setup as pretrain
from tests.conftest import TINY_MAE, parse
from util import backbones, transforms
from util.errors import InputError
from util.masking import random_masking_indices

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def photo():
    """A real photo at ImageNet's usual 500 x 375."""
    return Image.fromarray(load_sample_image('china.jpg')).resize((500, 375))


def image_args(input_size: int, **flags) -> argparse.Namespace:
    """The flags the transforms read, for an ImageFolder (not digits)."""
    return argparse.Namespace(
        input_size=input_size, crop_min=0.08, data_path='/images', dataset='auto', **flags
    )


# ------------------------------------------------------------ 1: MoCo v3's views


class OfficialBlur:
    """moco-v3's GaussianBlur: PIL's blur, radius uniform in [0.1, 2] from Python's random."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def official_byol_view(size: int, blur_p: float, solarize_p: float) -> v1.Compose:
    """main_moco.py's augmentation1 (solarize_p 0: no Solarize step) and augmentation2."""
    steps = [
        v1.RandomResizedCrop(size, scale=(0.08, 1.0)),  # bilinear: torchvision's default
        v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v1.RandomGrayscale(p=0.2),
        v1.RandomApply([OfficialBlur()], p=blur_p),
    ]
    if solarize_p:
        steps.append(v1.RandomApply([v1.Lambda(ImageOps.solarize)], p=solarize_p))
    return v1.Compose(steps + [v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(MEAN, STD)])


def test_mocov3_views_are_the_official_byol_views(photo):
    views = transforms.pretrain_transform(image_args(32, method='mocov3'))
    official = [official_byol_view(32, 1.0, 0.0), official_byol_view(32, 0.1, 0.2)]
    for seed in range(40):
        torch.manual_seed(seed)
        random.seed(seed)
        expected = [view(photo) for view in official]
        torch.manual_seed(seed)
        random.seed(seed)
        got = views(photo)
        for i in range(2):
            torch.testing.assert_close(got[i], expected[i], atol=1e-5, rtol=0)


def test_mocov3_views_work_on_tiny_images_and_tensors():
    """A digits-sized 8 x 8 image, and a uint8 tensor (--data_backend torchvision): PIL's blur
    through PIL and back gives the PIL image's pixels."""
    tiny = Image.fromarray(load_sample_image('flower.jpg')[::50, ::50][:8, :8])
    views = transforms.pretrain_transform(image_args(16, method='mocov3'))
    for seed in range(10):
        torch.manual_seed(seed)
        random.seed(seed)
        assert [v.shape for v in views(tiny)] == [(3, 16, 16)] * 2
        assert [v.shape for v in views(T.functional.pil_to_tensor(tiny))] == [(3, 16, 16)] * 2
    random.seed(0)
    from_pil = T.functional.pil_to_tensor(transforms.PILGaussianBlur()(tiny))
    random.seed(0)
    assert torch.equal(transforms.PILGaussianBlur()(T.functional.pil_to_tensor(tiny)), from_pil)


@pytest.mark.parametrize('argv', ['--num_workers 2', '--data_backend torchvision'])
def test_mocov3_views_are_seeded_per_sample(jpeg_folder, argv):  # noqa: F811
    """The views draw from each sample's seed, torch's and Python's (the blur's radius) alike:
    loader workers give the main process's views; a uint8 tensor's views are the PIL image's but
    for torch's resampling (a missed blur or solarization would be tens of levels off)."""
    (views, _), _ = first_batch(['--data_path', jpeg_folder, '--method', 'mocov3'])
    (other, _), _ = first_batch(['--data_path', jpeg_folder, '--method', 'mocov3'] + argv.split())
    if 'num_workers' in argv:
        assert torch.equal(views, other)
    else:
        levels = (views - other).abs() * torch.tensor(STD).view(3, 1, 1) * 255
        assert levels.mean() < 1 and levels.max() <= 8, (levels.mean(), levels.max())


# ------------------------------------------------------------ 2, 5, 9: fine-tuning


def finetune_args(argv: list) -> argparse.Namespace:
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args(argv)
    main_finetune.set_dataset_defaults(args)
    return args


def test_layer_grafted_semi_supervised_classifies_the_cls_token_without_bias(tmp_path):
    vit, path, _ = official_mocov3(tmp_path)
    args = finetune_args(['--finetune', str(path), '--init_from_projector'])
    assert args.global_pool is False  # tuneFromFirstFC on MoCo v3's ViT: the CLS token
    backbone = backbones.build_backbone(args.finetune, args.model, args.input_size)
    model = main_finetune.add_classifier(backbone, args, 10).eval()
    first = model.head[0]
    assert first.bias is None and torch.equal(first.weight, vit.head[0].weight)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.blocks(model._pos_embed(model.patch_embed(x)))
        cls = model.fc_norm(tokens)[:, 0]  # the final-normed CLS token
        expected = model.head[1](cls @ vit.head[0].weight.T)  # no bias in the first Linear
        torch.testing.assert_close(model(x), expected)
    # Without the projector, MAE's default stays: the mean of the patch tokens.
    assert finetune_args(['--finetune', str(path)]).global_pool is True


def grafted_finetune_commands() -> dict:
    """Parsed main_finetune.py commands of scripts/grafted_vitb_300ep.sh, by output folder."""
    commands = script_commands(f'{ROOT}/scripts/grafted_vitb_300ep.sh')
    parsed = [finetune_args(argv) for script, argv, _ in commands if script == 'main_finetune.py']
    return {args.output_dir.rsplit('/', 1)[-1]: args for args in parsed}


def test_grafted_script_runs_layer_grafted_finetune_recipes():
    commands = grafted_finetune_commands()
    # COMMANDS_AND_CHECKPOINTS.md, ViT-B: tunePretrained_mae.sh with its defaults (8 GPUs).
    full = commands['finetune']
    assert not full.global_pool and not full.init_from_projector
    assert full.batch_size * 8 == 1024 and full.blr == 5e-4 and full.layer_decay == 0.6
    assert full.epochs == 100 and full.drop_path == 0.1 and full.warmup_epochs == 5
    assert full.weight_decay == 0.05 and full.mixup == 0.8 and full.cutmix == 1.0
    semi = commands['semi10']
    assert not semi.global_pool and semi.init_from_projector
    assert semi.blr == 3e-5 and semi.layer_decay == 0.75 and semi.epochs == 200


@pytest.mark.parametrize('finetune', [True, False])
def test_finetune_classifier_bias_starts_at_zero(tmp_path, finetune):
    argv = []
    if finetune:
        torch.save(tiny_vit(num_heads=1, embed_dim=64).state_dict(), tmp_path / 'timm.pth')
        argv = ['--finetune', str(tmp_path / 'timm.pth')]
    args = finetune_args(argv)
    backbone = backbones.build_backbone(args.finetune, args.model, args.input_size)
    head = main_finetune.add_classifier(backbone, args, 10).head
    # MAE's models_vit: timm's init, zero head bias; the weight as before.
    assert torch.equal(head.bias, torch.zeros(10))
    if finetune:
        assert head.weight.abs().max() < 1e-4  # trunc_normal_(std=2e-5)


# ------------------------------------------------------------ 6, 8: the eval transform


def official_eval(input_size: int, interpolation) -> v1.Compose:
    """MAE's build_transform (eval), or Layer Grafted's Resize(256) + CenterCrop(224)."""
    crop_pct = 1.0
    if input_size <= 224:
        crop_pct = 224 / 256
    size = int(input_size / crop_pct)
    return v1.Compose(
        [
            v1.Resize(size, interpolation=interpolation),
            v1.CenterCrop(input_size),
            v1.ToTensor(),
            v1.Normalize(MEAN, STD),
        ]
    )


@pytest.mark.parametrize('input_size', [224, 384])
def test_eval_transform_is_maes_build_transform(photo, input_size):
    got = transforms.eval_transform(image_args(input_size))(photo)
    expected = official_eval(input_size, v1.InterpolationMode.BICUBIC)(photo)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_logreg_features_are_resized_bilinearly_as_layer_grafted(photo):
    linprobe = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()])
    args = linprobe.parse_args(['--protocol', 'logreg', '--data_path', '/images'])
    args.input_size = 224
    bilinear = official_eval(224, v1.InterpolationMode.BILINEAR)(photo)
    bicubic = official_eval(224, v1.InterpolationMode.BICUBIC)(photo)
    torch.testing.assert_close(transforms.eval_transform(args)(photo), bilinear, atol=1e-5, rtol=0)
    assert (bilinear - bicubic).abs().max() > 0.05  # the choice shows
    args.eval_interpolation = 'bicubic'
    torch.testing.assert_close(transforms.eval_transform(args)(photo), bicubic, atol=1e-5, rtol=0)
    args = linprobe.parse_args(['--protocol', 'knn', '--data_path', '/images'])
    args.input_size = 224
    torch.testing.assert_close(transforms.eval_transform(args)(photo), bicubic, atol=1e-5, rtol=0)


# ------------------------------------------------------------ 7: MAE's linear-probe crop


def official_clipped_box(height: int, width: int) -> tuple:
    """mae util/crop.py: one draw of area and log-ratio, then the box clipped to the image."""
    area = height * width * torch.empty(1).uniform_(0.08, 1.0).item()
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = min(int(round(math.sqrt(area * aspect))), width)
    h = min(int(round(math.sqrt(area / aspect))), height)
    top = torch.randint(0, height - h + 1, size=(1,)).item()
    left = torch.randint(0, width - w + 1, size=(1,)).item()
    return top, left, h, w


def test_mae_linprobe_crop_clips_in_one_draw(photo):
    view = transforms.mae_linprobe_view(image_args(32))
    crop = view.transforms[0]
    retried = 0
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, h, w = official_clipped_box(375, 500)
        flip = torch.rand(1) < 0.5
        expected = photo.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        expected = v1.Normalize(MEAN, STD)(v1.ToTensor()(expected))
        torch.manual_seed(seed)
        torch.testing.assert_close(view(photo), expected, atol=1e-5, rtol=0)
        torch.manual_seed(seed)
        box = T.RandomResizedCrop(32).make_params([photo])
        retried += (box['top'], box['left'], box['height'], box['width']) != (top, left, h, w)
    assert isinstance(crop, T.RandomResizedCrop) and retried > 30  # torchvision's would differ


def test_linear_probe_trains_on_maes_crop(tmp_path, monkeypatch):
    """main_linprobe's linear protocol without the feature cache takes mae_linprobe_view."""
    for split in ('train', 'val'):
        for label in ('red', 'blue'):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new('RGB', (20, 24), label).save(tmp_path / split / label / '0.png')
    calls = []

    def spy(args):
        calls.append(args.input_size)
        raise SystemExit(0)

    monkeypatch.setattr(transforms, 'mae_linprobe_view', spy)
    linprobe = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()])
    argv = f'--no-cache_features --device cpu --num_workers 0 --data_path {tmp_path}'
    with pytest.raises(SystemExit):
        main_linprobe.main(linprobe.parse_args(argv.split()))
    assert calls == [16]


# ------------------------------------------------------------ 10: MAE's mask count


def test_mae_refuses_a_mask_ratio_that_keeps_no_patch():
    # MAE's random_masking keeps int(16 x 0.05) = 0 patches: the encoder would see none.
    with pytest.raises(InputError, match='keeps int\\(16 x \\(1 - 0.95\\)\\) = 0 of the 16'):
        random_masking_indices(2, 16, 0.95)
    assert random_masking_indices(2, 16, 0.9375)[0].shape == (2, 1)  # int(16 x 0.0625) = 1
    args = parse(TINY_MAE + ['--mask_ratio', '0.95'])
    pretrain.resolve_args(args)
    with pytest.raises(InputError, match='--mask_ratio 0.95 keeps'):
        pretrain.build_mae(args)


# ------------------------------------------------------------ 11: DINO's position resampling


def dino_interpolated(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """dino vision_transformer.py interpolate_pos_encoding, for a square grid of `side`."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[2]
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim)
    scale = (side + 0.1) / math.sqrt(n)
    grid = F.interpolate(grid.permute(0, 3, 1, 2), scale_factor=(scale, scale), mode='bicubic')
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


@pytest.mark.parametrize('layout', ['teacher', 'plain'])
@pytest.mark.parametrize('img_size', [12, 28])
def test_dino_backbone_resampled_by_dinos_interpolation(tmp_path, layout, img_size):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    torch.nn.init.normal_(vit.pos_embed)
    state = vit.state_dict()
    if layout == 'teacher':  # a DINO training checkpoint
        state = {'teacher': {f'backbone.{k}': v for k, v in state.items()}}
    torch.save(state, tmp_path / 'dino.pth')
    loaded = backbones.load_backbone(str(tmp_path / 'dino.pth'), img_size=img_size)
    expected = dino_interpolated(vit.pos_embed.detach(), img_size // 4)
    torch.testing.assert_close(loaded.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    mae_rule = F.interpolate(
        vit.pos_embed[:, 1:].detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2),
        size=(img_size // 4, img_size // 4),
        mode='bicubic',
    )
    assert (mae_rule.permute(0, 2, 3, 1).reshape(1, -1, 64) - expected[:, 1:]).abs().max() > 1e-3
