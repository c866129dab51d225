"""The official recipes' values and the files the official code writes (issue 15).
Each expected value is computed here from the official formula, or read from a file written here
in the official layout."""

import argparse

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import MOCO, parse, save_official_mocov3
from test_checkpoint import MakesAFile, features, tiny_vit
from test_eval import run
from timm.models.beit import Beit

import main_finetune
import main_linprobe
import models_mae
import models_mimco
import models_mocov3
import pretrain_setup as pretrain
from tools import export
from util import backbones
from util.errors import InputError
from util.features import frozen_backbone
from util.lars import lars
from util.masking import build_mask_generator, random_masking_indices
from util.pos_embed import set_sincos_pos_embed

MAE = '--method mae --decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4'.split()
MAE += ['--num_workers', '0']

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def sincos_table(grid: int, dim: int, column_first: bool) -> torch.Tensor:
    """The 2-D sin-cos table from its definition: for the patch at (row r, column c), sin and cos of
    one coordinate times w_k = 10000^(-k / (dim / 4)), then of the other; a zero row for the CLS
    token. MAE takes the column first, MoCo v3 the row."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')

    def half(pos):
        angles = pos.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate(
        [half(cols), half(rows)] if column_first else [half(rows), half(cols)], axis=1
    )
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])).float().unsqueeze(0)


# ------------------------------------------------------------ 1: args Namespace


def official_training_files(tmp_path, vit) -> dict:
    """MAE's util/misc.py save_model, DINO's main_dino.py and DeiT's main.py layouts, each with the
    argparse.Namespace those scripts pickle."""
    sd = vit.state_dict()
    mae_args = argparse.Namespace(
        model='mae_vit_base_patch16',
        input_size=224,
        mask_ratio=0.75,
        blr=1.5e-3,
        norm_pix_loss=True,
        data_path='/datasets/imagenet',
        world_size=8,
        gpu=0,
    )
    dino_args = argparse.Namespace(
        arch='vit_small',
        patch_size=16,
        out_dim=65536,
        global_crops_scale=(0.4, 1.0),
        local_crops_number=8,
        optimizer='adamw',
        dist_url='env://',
    )
    deit_args = argparse.Namespace(
        model='deit_small_patch16_224',
        input_size=224,
        drop_path=0.1,
        mixup=0.8,
        smoothing=0.1,
        device='cuda',
        distributed=True,
    )
    files = {
        'mae': {
            'model': {
                **sd,
                'mask_token': torch.zeros(1, 1, 32),
                'decoder_embed.weight': torch.randn(32, 96),
            },
            'optimizer': {'state': {}, 'param_groups': []},
            'epoch': 799,
            'scaler': {'scale': 65536.0, '_growth_tracker': 10},
            'args': mae_args,
        },
        'dino': {
            'student': {f'module.backbone.{k}': v for k, v in sd.items()},
            'teacher': {f'backbone.{k}': v for k, v in sd.items()},
            'optimizer': {},
            'epoch': 100,
            'args': dino_args,
            'dino_loss': {'center': torch.zeros(1, 8)},
        },
        'deit': {
            'model': dict(sd),
            'optimizer': {},
            'lr_scheduler': {'t_initial': 300},
            'epoch': 299,
            'model_ema': dict(sd),
            'scaler': {},
            'args': deit_args,
        },
    }
    paths = {}
    for name, content in files.items():
        paths[name] = str(tmp_path / f'{name}.pth')
        torch.save(content, paths[name])
    return paths


def test_official_training_checkpoints_with_args_namespace_load(tmp_path):
    vit = tiny_vit()
    for name, path in official_training_files(tmp_path, vit).items():
        loaded = backbones.load_backbone(path, tiny_vit())
        torch.testing.assert_close(features(loaded), features(vit), atol=1e-5, rtol=0, msg=name)
    # A Namespace is let through, not what it holds: a pickle that would call code stays refused.
    victim = tmp_path / 'pwned.txt'
    torch.save(
        {'model': vit.state_dict(), 'args': argparse.Namespace(model=MakesAFile(str(victim)))},
        tmp_path / 'evil.pth',
    )
    with pytest.raises(InputError, match='could run code'):
        backbones.load_backbone(str(tmp_path / 'evil.pth'))
    assert not victim.exists()


# ------------------------------------------------------------ 2, 4: weight decay


def decay_of(argv: list, **settings) -> tuple:
    """(model, {parameter name: weight decay}) of main_pretrain's model and optimizer."""
    args = parse(argv)
    pretrain.resolve_args(args)
    vars(args).update(lr=1e-3, **settings)
    model, _ = pretrain.build_model(args)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = pretrain.build_optimizer(args, model).param_groups
    return model, {names[id(p)]: g['weight_decay'] for g in groups for p in g['params']}


def test_mocov3_decays_every_parameter_as_the_official_adamw():
    model, decay = decay_of(MOCO)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable and set(decay.values()) == {0.1}  # biases and norms too
    # Its LARS leaves the 1-D parameters undecayed (moco/optimizer.py: only ndim > 1).
    model, decay = decay_of(MOCO, optimizer='lars')
    assert all(d == (0.1 if model.get_parameter(n).ndim > 1 else 0.0) for n, d in decay.items())


def test_mae_decays_cls_and_mask_tokens():
    model, decay = decay_of(MAE)
    assert decay['encoder.cls_token'] == decay['mask_token'] == 0.05
    # Exempt: exactly the 1-D tensors (biases, norms); the fixed position tables are not trained.
    assert all(d == (0.05 if model.get_parameter(n).ndim > 1 else 0.0) for n, d in decay.items())
    assert 'encoder.pos_embed' not in decay


# ------------------------------------------------------------ 3: LARS


def test_lars_step_is_the_official_formula_at_weight_decay():
    torch.manual_seed(0)
    layer = torch.nn.Linear(
        16, 8, dtype=torch.float64
    )  # float64: the steps are 1e-4 of the weights
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = lars([{'params': list(layer.parameters()), 'weight_decay': 0.1}], lr=0.5)
    buffers = [torch.zeros_like(w0), torch.zeros_like(b0)]
    for _step in range(2):
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        layer.zero_grad()
        layer(torch.randn(32, 16, dtype=torch.float64)).square().mean().backward()
        g_w, g_b = layer.weight.grad.clone(), layer.bias.grad.clone()
        optimizer.step()
        # MAE util/lars.py, MoCo v3 moco/optimizer.py:
        # weights (ndim > 1): d = g + wd w, scaled by 0.001 |w| / |d|; biases: d = g; momentum 0.9.
        d = g_w + 0.1 * w
        buffers[0] = 0.9 * buffers[0] + 0.001 * w.norm() / d.norm() * d
        buffers[1] = 0.9 * buffers[1] + g_b
        # The steps themselves, to 1e-6 of their size (timm's trust ratio is 25 % off here).
        torch.testing.assert_close(
            layer.weight.detach() - w, -0.5 * buffers[0], rtol=1e-6, atol=1e-12
        )
        torch.testing.assert_close(
            layer.bias.detach() - b, -0.5 * buffers[1], rtol=1e-6, atol=1e-12
        )
    assert not torch.equal(layer.weight, w0) and not torch.equal(layer.bias, b0)


# ------------------------------------------------------------ 5, 6: MAE masking and positions


def test_mae_keeps_int_of_the_visible_fraction():
    ids_keep, _, mask = random_masking_indices(4, 196, 0.9)
    assert ids_keep.shape == (4, int(196 * (1 - 0.9))) == (4, 19)  # official random_masking
    assert (mask.sum(dim=1) == 196 - 19).all()
    # MimCo's masks keep their own count: round(0.9 * 196) masked.
    assert build_mask_generator('random', (14, 14), 0.9)().sum() == 176
    assert build_mask_generator('block', (14, 14), 0.9)().sum() == 176


def test_mae_sincos_tables_in_mae_layout_mocov3_in_its_own():
    mae = models_mae.MAE(timm.create_model('vit_digits_patch4_16', num_classes=0), 64, 1, 4)
    torch.testing.assert_close(
        mae.encoder.pos_embed.detach(), sincos_table(4, 128, True), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(mae.decoder_pos_embed, sincos_table(4, 64, True), atol=1e-6, rtol=0)
    vit = timm.create_model('vit_digits_patch4_16', num_classes=0)
    models_mocov3.mocov3_init(vit, stop_grad_conv1=True)
    torch.testing.assert_close(
        vit.pos_embed.detach(), sincos_table(4, 128, False), atol=1e-6, rtol=0
    )


# ------------------------------------------------------------ 7: layer decay of the final norm


@pytest.mark.parametrize('pool', ['--cls_token', '--global_pool'])
def test_finetune_final_norm_takes_layer_decay_scale_one(pool):
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args([pool])
    backbone = backbones.build_backbone(
        args.finetune, args.model, args.input_size, drop_path_rate=args.drop_path
    )
    model = main_finetune.add_classifier(backbone, args, 10)
    final_norm = model.fc_norm if isinstance(model.norm, torch.nn.Identity) else model.norm
    scale = {
        id(p): g['lr_scale']
        for g in main_finetune.layer_decay_groups(model, args)
        for p in g['params']
    }
    # MAE's get_layer_id_for_vit: blocks.i -> i + 1,
    # everything after the blocks -> depth + 1 (scale 1).
    assert scale[id(final_norm.weight)] == scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[5].mlp.fc1.weight)] == pytest.approx(0.75)
    assert scale[id(model.blocks[0].mlp.fc1.weight)] == pytest.approx(0.75**6)
    if pool == '--cls_token':  # the classifier still sees the final-normed CLS token
        model.eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            tokens = model.blocks(model._pos_embed(model.patch_embed(x)))
            torch.testing.assert_close(model(x), model.head(final_norm(tokens)[:, 0]))


# ------------------------------------------------------------ 8: resampling


@pytest.mark.parametrize('img_size', [8, 32])
def test_position_embeddings_resampled_as_mae_interpolate_pos_embed(tmp_path, img_size):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    # DeiT's layout: a plain backbone would be read as DINO's, resampled by DINO's rule.
    torch.save({'model': vit.state_dict()}, tmp_path / 'deit.pth')
    loaded = backbones.load_backbone(str(tmp_path / 'deit.pth'), img_size=img_size)
    # MAE/DeiT interpolate_pos_embed: plain bicubic (align_corners=False) on the patch grid;
    # CLS kept.
    grid = vit.pos_embed[:, 1:].detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    side = img_size // 4
    resampled = F.interpolate(grid, size=(side, side), mode='bicubic', align_corners=False)
    expected = torch.cat(
        [vit.pos_embed[:, :1].detach(), resampled.permute(0, 2, 3, 1).reshape(1, -1, 64)], 1
    )
    torch.testing.assert_close(loaded.pos_embed.detach(), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------ 9, 10: MoCo v3's other files


def test_mocov3_convert_to_deit_file_is_12_heads(tmp_path):
    vit = tiny_vit(num_heads=12)
    set_sincos_pos_embed(vit)  # MoCo v3's fixed table, as its pre-training leaves it
    # convert_to_deit.py: module.base_encoder.* without the projector, as {'model': ...}.
    torch.save(
        {'model': {k: v for k, v in vit.state_dict().items() if not k.startswith('head')}},
        tmp_path / 'deit_format.pth',
    )
    loaded = backbones.load_backbone(str(tmp_path / 'deit_format.pth'))
    assert loaded.blocks[0].attn.num_heads == 12
    torch.testing.assert_close(features(loaded), features(vit), atol=1e-5, rtol=0)


def test_mocov3_vit_small_refused_as_a_6_head_model(tmp_path):
    vit = timm.create_model('mocov3_vit_small', num_classes=0, img_size=32, depth=1)
    path = str(tmp_path / 'vit-s-300ep.pth.tar')
    save_official_mocov3(vit, path)
    six = timm.create_model('vit_small_patch16_224', num_classes=0, img_size=32, depth=1)
    with pytest.raises(InputError, match='12 attention heads.*--model mocov3_vit_small'):
        backbones.load_backbone(path, six)


def test_mocov3_main_lincls_file_loads(tmp_path):
    vit = tiny_vit(num_heads=12)
    vit.reset_classifier(10)
    sd = {
        f'module.{k}': v for k, v in vit.state_dict().items()
    }  # DDP-wrapped ViT with its linear head
    torch.save(
        {'epoch': 90, 'arch': 'vit_small', 'state_dict': sd, 'best_acc1': 73.2, 'optimizer': {}},
        tmp_path / 'linear-vit-s-300ep.pth.tar',
    )
    loaded = backbones.load_backbone(str(tmp_path / 'linear-vit-s-300ep.pth.tar'))
    assert loaded.blocks[0].attn.num_heads == 12
    torch.testing.assert_close(features(loaded), features(vit), atol=1e-5, rtol=0)


# ------------------------------------------------------------ files of our own scripts


def test_finetune_output_loads_back_everywhere(tmp_path):
    out = tmp_path / 'ft'
    common = ['--num_workers', 0, '--print_freq', 1000]
    run(
        main_finetune,
        '--epochs',
        1,
        '--warmup_epochs',
        0,
        '--batch_size',
        64,
        '--output_dir',
        out,
        *common,
    )
    best = str(out / 'checkpoint-best.pth')
    saved = torch.load(best, weights_only=True)
    assert 'fc_norm.weight' in saved['model'] and 'norm.weight' not in saved['model']
    # As the model its args name (vit_digits_patch4_16: 4 heads), also without the saved head count.
    del saved['num_heads']
    torch.save(saved, tmp_path / 'no_heads.pth')
    for path in (best, str(tmp_path / 'no_heads.pth')):
        loaded = backbones.load_backbone(path)
        assert loaded.blocks[0].attn.num_heads == 4
        assert torch.equal(loaded.fc_norm.weight, saved['model']['fc_norm.weight'])
    finetuned = timm.create_model('vit_digits_patch4_16', num_classes=10, global_pool='avg')
    finetuned.load_state_dict(saved['model'])
    loaded.reset_classifier(0, 'avg')
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = finetuned.forward_features(x)  # (B, 1 + N, D), before its final norm (fc_norm)
        torch.testing.assert_close(loaded(x), finetuned.forward_head(tokens, pre_logits=True))
        # As a MimCo teacher, its patch targets are final-normed as any other teacher's.
        torch.testing.assert_close(
            models_mimco.Teacher(loaded)(x)[1], finetuned.fc_norm(tokens)[:, 1:]
        )
    knn = run(
        main_linprobe,
        '--protocol',
        'knn',
        '--finetune',
        best,
        '--output_dir',
        tmp_path / 'knn',
        *common,
    )
    assert knn['acc1'] > 20
    run(
        main_linprobe,
        '--checkpoint',
        best,
        '--epochs',
        1,
        '--warmup_epochs',
        0,
        '--output_dir',
        tmp_path / 'lin',
        *common,
    )
    run(main_finetune, '--finetune', best, '--eval', '--output_dir', tmp_path / 'eval', *common)
    assert (
        export.main(
            export.get_args_parser().parse_args(
                ['--checkpoint', best, '--output', str(tmp_path / 'exported.pth')]
            )
        )
        == 'vit_digits_patch4_16'
    )


def test_finetune_output_of_a_12_head_file_loads_with_12_heads(tmp_path):
    vit = tiny_vit(num_heads=12)
    torch.save(
        {
            'state_dict': {f'module.base_encoder.{k}': v for k, v in vit.state_dict().items()},
            'arch': 'vit_small',
        },
        tmp_path / 'moco.pth',
    )
    run(
        main_finetune,
        '--finetune',
        tmp_path / 'moco.pth',
        '--epochs',
        1,
        '--warmup_epochs',
        0,
        '--batch_size',
        256,
        '--num_workers',
        0,
        '--print_freq',
        1000,
        '--output_dir',
        tmp_path / 'ft',
    )
    assert (
        backbones.load_backbone(str(tmp_path / 'ft' / 'checkpoint-last.pth'))
        .blocks[0]
        .attn.num_heads
        == 12
    )


def test_vit_without_class_token_works_in_the_probes(tmp_path):
    vit = tiny_vit(num_heads=1, embed_dim=64, class_token=False, global_pool='avg')
    torch.save(vit.state_dict(), tmp_path / 'avg.pth')
    args = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()]).parse_args(
        ['--checkpoint', str(tmp_path / 'avg.pth')]
    )
    backbone = frozen_backbone(
        args.checkpoint, args.model, args.input_size, args.global_pool, args.seed
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(x), vit(x)
        )  # fc_norm of the average of the patch tokens
    metrics = run(
        main_linprobe,
        '--protocol',
        'knn',
        '--checkpoint',
        tmp_path / 'avg.pth',
        '--num_workers',
        0,
        '--print_freq',
        1000,
        '--output_dir',
        tmp_path / 'knn',
    )
    assert 0 <= metrics['acc1'] <= 100


def test_beit_file_is_refused_in_one_line(tmp_path):
    beit = Beit(
        img_size=16,
        patch_size=4,
        embed_dim=64,
        depth=1,
        num_heads=1,
        num_classes=0,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
    )
    torch.save(beit.state_dict(), tmp_path / 'beit.pth')
    with pytest.raises(InputError, match='BEiT/SimMIM'):
        backbones.load_backbone(str(tmp_path / 'beit.pth'))


def test_formats_are_announced_by_what_they_are(tmp_path, capsys):
    vit = tiny_vit(num_heads=1, embed_dim=64)
    torch.save(
        vit.state_dict(), tmp_path / 'dino_deitsmall16_pretrain.pth'
    )  # DINO's released backbones
    set_sincos_pos_embed(vit, mae_layout=True)  # MAE's encoder-only release: {'model': ...}
    torch.save({'model': vit.state_dict()}, tmp_path / 'mae_pretrain_vit.pth')
    for name, announced in (
        ('dino_deitsmall16_pretrain.pth', 'DINO backbone'),
        ('mae_pretrain_vit.pth', 'MAE encoder'),
    ):
        assert backbones.read_backbone(str(tmp_path / name))[2]['format'] == announced
    backbones.load_backbone(str(tmp_path / 'mae_pretrain_vit.pth'))
    printed = capsys.readouterr().out
    assert 'MAE encoder format' in printed and 'heads assumed' in printed and '--model' in printed


def test_linprobe_takes_finetune_as_the_checkpoint_flag():
    args = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()]).parse_args(
        ['--finetune', 'x.pth']
    )
    assert args.checkpoint == 'x.pth'
