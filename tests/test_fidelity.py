"""The official recipes' values (issue 15), each computed here from the official formula."""
import argparse

import numpy as np
import pytest
import timm
import torch
from conftest import MOCO, parse
from test_eval import one_thread  # noqa: F401  (autouse: one intra-op thread)

import engine
import main_finetune
import main_pretrain
import models_mimco
from util.masking import build_mask_generator, random_masking_indices

MAE = ['--method', 'mae', '--decoder_embed_dim', '64', '--decoder_depth', '2', '--decoder_num_heads', '4',
       '--num_workers', '0']


def sincos_table(grid: int, dim: int, column_first: bool) -> torch.Tensor:
    """The 2-D sin-cos table from its definition: for the patch at (row r, column c), sin and cos of
    one coordinate times w_k = 10000^(-k / (dim / 4)), then of the other; a zero row for the CLS token.
    MAE takes the column first, MoCo v3 the row."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')

    def half(pos):
        angles = pos.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    table = np.concatenate([half(cols), half(rows)] if column_first else [half(rows), half(cols)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])).float().unsqueeze(0)


# --------------------------------------------------------------------------- 2, 4: weight decay

def decay_of(argv: list, **settings) -> tuple:
    """(model, {parameter name: weight decay}) of main_pretrain's model and optimizer."""
    args = parse(argv)
    main_pretrain.resolve_defaults(args)
    vars(args).update(lr=1e-3, **settings)
    model, _ = main_pretrain.build_model(args)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = main_pretrain.build_optimizer(args, model).param_groups
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


# --------------------------------------------------------------------------- 3: LARS

def test_lars_step_is_the_official_formula_at_weight_decay():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, dtype=torch.float64)  # float64: the steps are 1e-4 of the weights
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = engine.lars([{'params': list(layer.parameters()), 'weight_decay': 0.1}], lr=0.5)
    buffers = [torch.zeros_like(w0), torch.zeros_like(b0)]
    for step in range(2):
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        layer.zero_grad()
        layer(torch.randn(32, 16, dtype=torch.float64)).square().mean().backward()
        g_w, g_b = layer.weight.grad.clone(), layer.bias.grad.clone()
        optimizer.step()
        # MAE util/lars.py, MoCo v3 moco/optimizer.py: d = g + wd w, scaled by 0.001 |w| / |d| (ndim > 1);
        # biases: d = g; momentum 0.9.
        d = g_w + 0.1 * w
        buffers[0] = 0.9 * buffers[0] + 0.001 * w.norm() / d.norm() * d
        buffers[1] = 0.9 * buffers[1] + g_b
        # The steps themselves, to 1e-6 of their size (timm's trust ratio is 25 % off here).
        torch.testing.assert_close(layer.weight.detach() - w, -0.5 * buffers[0], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(layer.bias.detach() - b, -0.5 * buffers[1], rtol=1e-6, atol=1e-12)
    assert not torch.equal(layer.weight, w0) and not torch.equal(layer.bias, b0)


# --------------------------------------------------------------------------- 5, 6: MAE masking and positions

def test_mae_keeps_int_of_the_visible_fraction():
    ids_keep, _, mask = random_masking_indices(4, 196, 0.9)
    assert ids_keep.shape == (4, int(196 * (1 - 0.9))) == (4, 19)  # official random_masking
    assert (mask.sum(dim=1) == 196 - 19).all()
    # MimCo's masks keep their own count: round(0.9 * 196) masked.
    assert build_mask_generator('random', (14, 14), 0.9)().sum() == 176
    assert build_mask_generator('block', (14, 14), 0.9)().sum() == 176


def test_mae_sincos_tables_in_mae_layout_mocov3_in_its_own():
    mae = models_mimco.MAE(timm.create_model('vit_digits_patch4_16', num_classes=0), 64, 1, 4)
    torch.testing.assert_close(mae.encoder.pos_embed.detach(), sincos_table(4, 128, True), atol=1e-6, rtol=0)
    torch.testing.assert_close(mae.decoder_pos_embed, sincos_table(4, 64, True), atol=1e-6, rtol=0)
    vit = timm.create_model('vit_digits_patch4_16', num_classes=0)
    models_mimco.mocov3_init(vit, stop_grad_conv1=True)
    torch.testing.assert_close(vit.pos_embed.detach(), sincos_table(4, 128, False), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 7: layer decay of the final norm

@pytest.mark.parametrize('pool', ['--cls_token', '--global_pool'])
def test_finetune_final_norm_takes_layer_decay_scale_one(pool):
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args([pool])
    model = main_finetune.add_classifier(main_finetune.build_backbone(args), args, 10)
    final_norm = model.fc_norm if isinstance(model.norm, torch.nn.Identity) else model.norm
    scale = {id(p): g['lr_scale'] for g in main_finetune.layer_decay_groups(model, args) for p in g['params']}
    # MAE's get_layer_id_for_vit: blocks.i -> i + 1, everything after the blocks -> depth + 1 (scale 1).
    assert scale[id(final_norm.weight)] == scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[5].mlp.fc1.weight)] == pytest.approx(0.75)
    assert scale[id(model.blocks[0].mlp.fc1.weight)] == pytest.approx(0.75 ** 6)
    if pool == '--cls_token':  # the classifier still sees the final-normed CLS token
        model.eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            tokens = model.blocks(model._pos_embed(model.patch_embed(x)))
            torch.testing.assert_close(model(x), model.head(final_norm(tokens)[:, 0]))
