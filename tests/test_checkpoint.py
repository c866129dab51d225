"""Backbones in every official format load through load_backbone and give the original features."""

import os

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import models_mocov3
from util import backbones, checkpoint
from util.errors import InputError


def tiny_vit(num_heads=12, embed_dim=96, **kwargs):
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=embed_dim,
        depth=2,
        num_heads=num_heads,
        num_classes=0,
        **kwargs,
    )
    # Non-trivial values everywhere, so a key loaded into the wrong place shows.
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit.eval()


def features(vit, seed=1):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vit.forward_features(x)


def mocov3_file(path, vit):
    """The official MoCo v3 layout: module.{base,momentum}_encoder.*, module.predictor.*, arch."""
    moco = models_mocov3.MoCoV3(vit, dim=32, mlp_dim=64)
    sd = {f'module.{k}': v for k, v in moco.state_dict().items()}
    torch.save({'epoch': 300, 'arch': 'vit_small', 'state_dict': sd, 'optimizer': {}}, path)
    return moco


def test_mocov3_official_format_12_heads(tmp_path):
    vit = tiny_vit(num_heads=12)
    reference = features(vit)
    moco = mocov3_file(tmp_path / 'moco.pth', vit)
    loaded = backbones.load_backbone(str(tmp_path / 'moco.pth'))
    assert loaded.blocks[0].attn.num_heads == 12 and not loaded.training
    torch.testing.assert_close(features(loaded), reference, atol=1e-5, rtol=0)
    # The projector (base_encoder.head) is kept aside and equals the original.
    projector = backbones.load_projector(str(tmp_path / 'moco.pth'))
    z = torch.randn(5, 96)
    moco.base_encoder.head.eval()
    torch.testing.assert_close(projector(z), moco.base_encoder.head(z))


def test_mocov3_official_vit_small_by_name(tmp_path):
    vit = timm.create_model('mocov3_vit_small', num_classes=0, img_size=32).eval()
    assert vit.blocks[0].attn.num_heads == 12
    mocov3_file(tmp_path / 'moco.pth', vit)
    loaded = backbones.load_backbone(str(tmp_path / 'moco.pth'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_features(x), vit.forward_features(x), atol=1e-5, rtol=0
        )


def test_dino_plain_and_full(tmp_path):
    vit = tiny_vit(num_heads=1, embed_dim=64)  # DINO/timm convention: heads = width / 64
    reference = features(vit)
    torch.save(vit.state_dict(), tmp_path / 'dino_plain.pth')
    full = {
        'teacher': {f'backbone.{k}': v for k, v in vit.state_dict().items()},
        'student': {f'module.backbone.{k}': v + 1 for k, v in vit.state_dict().items()},
        'epoch': 100,
    }
    full['teacher']['head.mlp.0.weight'] = torch.randn(8, 64)
    torch.save(full, tmp_path / 'dino_full.pth')
    for name in ('dino_plain.pth', 'dino_full.pth'):
        loaded = backbones.load_backbone(str(tmp_path / name))
        torch.testing.assert_close(features(loaded), reference, atol=1e-5, rtol=0)


def test_mae_and_timm_formats(tmp_path):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    reference = features(vit)
    sd = dict(vit.state_dict())
    sd.update(
        {
            'mask_token': torch.zeros(1, 1, 64),
            'decoder_embed.weight': torch.randn(32, 64),
            'decoder_pos_embed': torch.randn(1, 17, 32),
        }
    )
    torch.save({'model': sd}, tmp_path / 'mae.pth')
    torch.save(vit.state_dict(), tmp_path / 'timm.pth')
    for name in ('mae.pth', 'timm.pth'):
        loaded = backbones.load_backbone(str(tmp_path / name))
        torch.testing.assert_close(features(loaded), reference, atol=1e-5, rtol=0)


def test_given_model_and_resampled_grid(tmp_path):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    torch.save(vit.state_dict(), tmp_path / 'timm.pth')
    target = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=1, num_classes=0
    )
    loaded = backbones.load_backbone(str(tmp_path / 'timm.pth'), target)
    assert loaded.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(loaded.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


def test_wrong_architecture_is_named(tmp_path):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    torch.save(vit.state_dict(), tmp_path / 'timm.pth')
    wrong = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=128, depth=2, num_heads=2, num_classes=0
    )
    with pytest.raises(InputError, match=r'embed_dim 64, depth 2.*--teacher_model'):
        backbones.load_backbone(str(tmp_path / 'timm.pth'), wrong, flag='--teacher_model')
    deeper = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=1, num_classes=0
    )
    with pytest.raises(InputError, match=r'missing blocks\.2'):
        backbones.load_backbone(str(tmp_path / 'timm.pth'), deeper)


def test_not_a_vit_and_corrupt_file(tmp_path):
    resnet = timm.create_model('resnet10t', num_classes=0)
    torch.save(resnet.state_dict(), tmp_path / 'resnet.pth')
    with pytest.raises(InputError, match='holds no Vision Transformer'):
        backbones.load_backbone(str(tmp_path / 'resnet.pth'))
    (tmp_path / 'broken.pth').write_bytes(b'not a checkpoint at all')
    with pytest.raises(InputError, match='not a readable PyTorch checkpoint'):
        backbones.load_backbone(str(tmp_path / 'broken.pth'))
    with pytest.raises(InputError, match='does not exist'):
        backbones.load_backbone(str(tmp_path / 'missing.pth'))


class MakesAFile:
    """A pickle payload that would create a file when unpickled without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_pickle_that_runs_code_is_refused(tmp_path):
    victim = tmp_path / 'pwned.txt'
    torch.save({'model': MakesAFile(str(victim))}, tmp_path / 'evil.pth')
    assert not victim.exists()
    with pytest.raises(InputError, match='could run code'):
        backbones.load_backbone(str(tmp_path / 'evil.pth'))
    assert not victim.exists()


def test_atomic_save_leaves_no_temporary(tmp_path):
    path = str(tmp_path / 'checkpoint-last.pth')
    checkpoint.save_checkpoint({'epoch': 3, 'model': {'w': torch.ones(2)}}, path)
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']
    assert checkpoint.load_file(path)['epoch'] == 3
