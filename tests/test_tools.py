"""tools/visualize.py, tools/export.py, util/figures.py
and the full-scale scripts' command lines."""

import argparse
import glob
import json
import os
import re
import shlex
import struct

import pytest
import timm
import torch
from conftest import FAST, ROOT, parse, save_official_mocov3

import main_finetune
import main_linprobe
import main_pretrain
import models_vit
from tools import export, visualize
from util import backbones
from util.errors import InputError

SCRIPTS = {
    'main_pretrain.py': main_pretrain,
    'main_finetune.py': main_finetune,
    'main_linprobe.py': main_linprobe,
}


# ------------------------------------------------------------ full-scale scripts


def script_commands(path: str) -> list:
    """(script, argv) of every python command in a bash script,
    its variables set to their defaults."""
    with open(path) as f:
        text = f.read().replace('\\\n', ' ')
    values = {}
    for name, default in re.findall(r'^(\w+)=\$\{\w+:-([^}]*)\}', text, flags=re.M):
        values[name] = default
    commands = []
    for line in text.splitlines():
        line = line.split(' #')[0]
        found = re.search(r'\b(main_\w+\.py)\s(.*)', line)
        if not found or line.lstrip().startswith('#'):
            continue
        expanded = re.sub(r'\$\{?(\w+)\}?', lambda m: values[m.group(1)], found.group(2))
        commands.append((found.group(1), shlex.split(expanded), line))
    return commands


# The miniature's scripts run on digits (tests/test_demo.py); the others are full scale.
MINIATURE = {'demo.sh', 'demo_lib.sh', 'mimco_study.sh', 'graft_study.sh'}
FULL_SCALE = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, 'scripts', '*.sh'))
    if os.path.basename(p) not in MINIATURE
)


def test_there_are_full_scale_scripts():
    names = {os.path.basename(p) for p in FULL_SCALE}
    assert {
        'mimco_vits_100ep.sh',
        'mocov3_vits_300ep.sh',
        'mae_vitb_1600ep.sh',
        'grafted_vitb_300ep.sh',
    } <= names


@pytest.mark.parametrize('path', FULL_SCALE, ids=os.path.basename)
def test_full_scale_script_parses(path):
    """Every python command of the script parses with its script's own parser: a renamed or removed
    flag fails here, not after a day in the queue."""
    commands = script_commands(path)
    assert commands, f'{path} holds no python command'
    with open(path) as f:  # torchrun unless LAUNCH says otherwise (SLURM: submitit_launch.py)
        assert 'LAUNCH=${LAUNCH:-torchrun --nproc_per_node 8}\n' in f.read()
    for script, argv, line in commands:
        assert line.lstrip().startswith(f'$LAUNCH {script}'), line
        parser = argparse.ArgumentParser(
            script, parents=[SCRIPTS[script].get_args_parser()], exit_on_error=False
        )
        try:
            args = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            pytest.fail(f'{os.path.basename(path)}: {script} {shlex.join(argv)}: {e}')
        assert args.data_path == '/imagenet'


# ------------------------------------------------------------ attention and pictures


def test_cls_attention_is_the_blocks_own_attention():
    """Weights from the qkv projection, times v and through proj, give what the last block's fused
    attention computes: the maps are the ones the model uses."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_digits_patch4_16', num_classes=0).eval()
    images = torch.randn(3, 3, 16, 16)
    maps = models_vit.cls_attention(vit, images)  # (B, heads, 4, 4)
    assert maps.shape == (3, 4, 4, 4)
    with torch.no_grad():
        x = vit.blocks[:-1](vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))
        block = vit.blocks[-1]
        tokens = block.norm1(x)
        expected = block.attn(tokens)[:, 0]  # (B, D) the CLS token's attention output
        B, N, D = tokens.shape
        qkv = block.attn.qkv(tokens).reshape(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
        cls_to_cls = 1 - maps.flatten(2).sum(-1, keepdim=True)  # each softmax row sums to one
        weights = torch.cat([cls_to_cls, maps.flatten(2)], dim=2)  # (B, heads, 1+N)
        out = (weights.unsqueeze(2) @ qkv[2]).squeeze(2)  # (B, heads, head_dim)
        got = block.attn.proj(out.reshape(B, D))
    assert torch.allclose(got, expected, atol=1e-5)


def png_size(path: str) -> tuple:
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return struct.unpack('>II', header[16:24])


@pytest.fixture(scope='module')
def mae_path(tmp_path_factory):
    """One epoch of MAE."""
    out = str(tmp_path_factory.mktemp('mae'))
    main_pretrain.main(
        parse(
            '--method mae --epochs 1 --warmup_epochs 0'.split()
            + '--decoder_embed_dim 32 --decoder_depth 1 --decoder_num_heads 4'.split()
            + ['--output_dir', out]
            + FAST
        )
    )
    return out


def test_visualize(teacher_path, mae_path, tmp_path, capsys):
    out = str(tmp_path / 'pictures')
    checkpoints = [
        'random',
        os.path.join(teacher_path, 'checkpoint-last.pth'),
        os.path.join(mae_path, 'checkpoint-last.pth'),
    ]
    args = visualize.get_args_parser().parse_args(
        [
            '--checkpoints',
            *checkpoints,
            '--names',
            'random',
            'mocov3',
            'mae',
            '--output_dir',
            out,
            '--num_images',
            '4',
            '--tsne_iters',
            '250',
            '--logreg_iters',
            '100',
        ]
    )
    written = visualize.main(args)
    expected = {
        'tsne.png': (3 * 400, 400),
        'attention.png': (4 * 150, 4 * 150),
        'mae_reconstruction_mae.png': (4 * 150, 3 * 150),
    }
    assert sorted(os.path.basename(p) for p in written) == sorted(
        list(expected) + ['separability.json']
    )
    for name, size in expected.items():
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 5000 and png_size(path) == size, name
    printed = re.findall(
        r'separability \| (\S+) \| logreg val top-1 ([\d.]+) % \| Fisher ratio ([\d.]+)',
        capsys.readouterr().out,
    )
    scores = {name: (float(acc), float(fisher)) for name, acc, fisher in printed}
    assert set(scores) == {'random', 'mocov3', 'mae'}
    with open(os.path.join(out, 'separability.json')) as f:
        saved = json.load(f)
    for name, (acc, fisher) in scores.items():  # the printed values, to their printed places
        assert round(saved[name]['logreg'], 1) == acc and round(saved[name]['fisher'], 3) == fisher
    # A few epochs of MoCo v3 already separate the classes better than random weights do.
    assert (
        scores['mocov3'][0] > scores['random'][0] and scores['mocov3'][1] > scores['random'][1]
    ), scores


# ------------------------------------------------------------ export


@torch.no_grad()
def features(model, size=16):
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model.eval().forward_features(images)


def export_then_load(source: str, name: str, out: str):
    """tools/export.py of `source` as timm's `name`, loaded back the way the README shows."""
    export.main(
        export.get_args_parser().parse_args(
            ['--checkpoint', source, '--model', name, '--output', out]
        )
    )
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=out), num_classes=0
    )


def test_export_loads_into_timm(teacher_path, tmp_path):
    source = os.path.join(teacher_path, 'checkpoint-last.pth')
    out = str(tmp_path / 'teacher_timm.pth')
    name = export.main(
        export.get_args_parser().parse_args(['--checkpoint', source, '--output', out])
    )
    assert name == 'vit_digits_patch4_16'
    assert all(
        not k.startswith(('head', 'base_encoder', 'momentum'))
        for k in torch.load(out, weights_only=True)
    )
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=out), num_classes=0
    )
    torch.testing.assert_close(
        features(model), features(backbones.load_backbone(source)), atol=1e-5, rtol=0
    )
    assert not torch.allclose(
        features(model), features(timm.create_model(name, num_classes=0)), atol=1e-3
    )


def test_export_checks_the_architecture(tmp_path):
    """An official-format MoCo v3 ViT-S (12 heads) exports as mocov3_vit_small, and is refused as
    timm's 6-head vit_small_patch16_224, whose weights have the same shapes but other features."""
    torch.manual_seed(0)
    vit = timm.create_model('mocov3_vit_small', num_classes=0)
    source = str(tmp_path / 'vit-s-300ep.pth.tar')
    save_official_mocov3(vit, source)
    with pytest.raises(InputError, match='mocov3_vit_small'):
        export.main(
            export.get_args_parser().parse_args(
                ['--model', 'vit_small_patch16_224', '--checkpoint', source]
                + ['--output', str(tmp_path / 'bad.pth')]
            )
        )
    assert sorted(os.listdir(tmp_path)) == ['vit-s-300ep.pth.tar']  # nothing written
    model = export_then_load(source, 'mocov3_vit_small', str(tmp_path / 'mocov3_vits_timm.pth'))
    torch.testing.assert_close(features(model, 224), features(vit, 224), atol=1e-5, rtol=0)
    assert 'mocov3_vit_small' in timm.list_models()  # registered by util/architectures.py


def test_export_plain_timm_vit_small(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model('vit_small_patch16_224', num_classes=0)
    source = str(tmp_path / 'plain.pth')
    torch.save(vit.state_dict(), source)
    model = export_then_load(source, 'vit_small_patch16_224', str(tmp_path / 'exported.pth'))
    torch.testing.assert_close(features(model, 224), features(vit, 224), atol=1e-5, rtol=0)
