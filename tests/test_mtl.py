"""Layer Grafted's argument on digits: the MTL baseline (MAE + MoCo v3 on one encoder), the reverse
cascade (MoCo v3, then MAE) and the per-sample gradient conflict."""

import copy
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import main_pretrain
import pretrain_setup as pretrain
from tests.conftest import FAST, epoch_losses, parse
from tools import conflict_table, export, grad_conflict
from util import data, transforms
from util.errors import InputError

HEADS = '--decoder_embed_dim 32 --decoder_depth 1 --decoder_num_heads 2 --moco_mlp_dim 64'
MTL = f'--method mtl {HEADS} --moco_dim 32 --drop_path 0'.split() + FAST
MAE = f'--method mae {HEADS}'.split() + FAST


# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def mtl_model_and_batch(argv, n=16):
    """An MTL model built as main_pretrain.py builds it, and a batch of its real views on digits:
    (model, (view1, view2, mim_view, noise))."""
    torch.manual_seed(0)
    args = parse(MTL + argv + ['--output_dir', ''])
    pretrain.resolve_args(args)
    model, _ = pretrain.build_model(args)
    dataset = data.build_dataset(
        args, True, transforms.pretrain_transform(args, model.mask_generator)
    )
    inputs, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=n)))
    return model, inputs


def test_mtl_loss_is_mae_loss_plus_weighted_moco_loss():
    """On the same weights and views, MTL's loss and its shared encoder's gradient equal those of
    the existing MAE and MoCoV3, each on its own copy of the encoder: MAE + 0.3 x MoCo v3."""
    model, (view1, view2, mim_view, noise) = mtl_model_and_batch(['--mtl_cl_weight', '0.3'])
    assert model.mae.encoder is model.moco.base_encoder  # one encoder
    assert view1.shape == mim_view.shape and noise.shape == (16, 16)
    assert not torch.equal(view1, mim_view) and not torch.equal(view1, view2)
    mae = copy.deepcopy(model.mae)  # each copy gets its own encoder
    moco = copy.deepcopy(model.moco)
    loss, terms = model(view1, view2, mim_view, noise)
    mae_loss, _ = mae(mim_view, noise)
    moco_loss, _ = moco(view1, view2)
    torch.testing.assert_close(loss, mae_loss + 0.3 * moco_loss)
    torch.testing.assert_close(terms['mae_loss'], mae_loss.detach())
    torch.testing.assert_close(terms['moco_loss'], moco_loss.detach())
    loss.backward()
    (mae_loss + 0.3 * moco_loss).backward()  # the copies' gradients: MAE's, and 0.3 x MoCo v3's
    compared = 0
    for (name, p), q, r in zip(
        model.moco.base_encoder.named_parameters(),
        mae.encoder.parameters(),
        moco.base_encoder.parameters(),
    ):
        if name.startswith('head.'):  # the projector: MoCo v3's alone
            torch.testing.assert_close(p.grad, r.grad)
        elif p.requires_grad:  # float32 sums in another order: 1e-5 of the gradient's size
            torch.testing.assert_close(
                p.grad, q.grad + r.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max()
            )
            compared += 1
    assert compared >= 6 * 12  # every block
    decoder = dict(mae.named_parameters())
    for name, p in model.mae.named_parameters():
        if name.startswith(('decoder', 'mask_token')):  # the decoder: MAE's gradient alone
            torch.testing.assert_close(p.grad, decoder[name].grad)


@pytest.mark.slow  # 40 s on 2 shared cores
def test_mtl_trains_logs_both_terms_and_exports(tmp_path):
    out = tmp_path / 'mtl'
    argv = MTL + '--batch_size 256 --epochs 2 --warmup_epochs 1 --blr 2e-3 --knn_freq 2'.split()
    main_pretrain.main(parse(argv + ['--output_dir', str(out)]))
    with open(out / 'log.txt') as f:
        epochs = [e for e in map(json.loads, f) if 'train_loss' in e]
    assert len(epochs) == 2
    for e in epochs:
        assert e['train_loss'] == pytest.approx(e['train_mae_loss'] + e['train_moco_loss'])
    losses = epoch_losses(out)
    assert losses[-1] < losses[0] - 0.3, losses
    assert epochs[-1]['knn_acc1'] > 30
    exported = str(tmp_path / 'timm.pth')
    name = export.main(
        export.get_args_parser().parse_args(
            ['--checkpoint', str(out / 'checkpoint-last.pth'), '--output', exported]
        )
    )
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'file': exported})
    state = torch.load(out / 'checkpoint-last.pth', weights_only=True)['model']
    torch.testing.assert_close(
        model.blocks[5].mlp.fc2.weight, state['moco.base_encoder.blocks.5.mlp.fc2.weight']
    )


def test_mtl_refuses_block_masks_and_graft_flags():
    with pytest.raises(InputError, match='--method mtl masks uniformly'):
        main_pretrain.main(parse(MTL + ['--mask_type', 'block']))
    with pytest.raises(InputError, match='--method mae \\(the reverse cascade\\)'):
        main_pretrain.main(parse(MTL + ['--lr_layer_wise', '1,1,1']))


# ------------------------------------------------------------ the reverse cascade


@pytest.fixture(scope='module')
def mocov3_path(tmp_path_factory):
    """A MoCo v3 run of ours on digits, one epoch: the first stage of the reverse cascade."""
    out = tmp_path_factory.mktemp('mocov3')
    argv = MTL + '--method mocov3 --batch_size 256 --epochs 1 --knn_freq 0'.split()
    main_pretrain.main(parse(argv + ['--output_dir', str(out)]))
    return out / 'checkpoint-last.pth'


def test_reverse_cascade_starts_from_the_file_with_three_lrs(mocov3_path):
    args = parse(
        MAE
        + ['--graft_pretrained', str(mocov3_path), '--lr_layer_wise', '0.2,0.5,1']
        + ['--graft_freeze_blocks', '1', '--output_dir', '']
    )
    pretrain.resolve_args(args)
    model, _ = pretrain.build_model(args)
    moco = torch.load(mocov3_path, weights_only=True)['model']
    encoder = model.encoder.state_dict()
    assert len(encoder) == 78
    for name, value in encoder.items():
        assert torch.equal(value, moco[f'base_encoder.{name}']), name
    optimizer = pretrain.build_optimizer(args, model)
    lr_scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group['params']:
            lr_scale[names[id(p)]] = group['lr_scale']
    for i in range(1, 6):  # block 0 is frozen (--graft_freeze_blocks 1), so in no group
        expected = [0.2, 0.5, 1.0][i // 2]
        block = {s for n, s in lr_scale.items() if n.startswith(f'encoder.blocks.{i}.')}
        assert block == {expected}, (i, block)
    assert not any(n.startswith(('encoder.blocks.0.', 'encoder.cls_token')) for n in lr_scale)
    assert not any('patch_embed' in n or 'pos_embed' in n for n in lr_scale)
    # The decoder, the mask token and the final norm train at the last group's lr.
    assert lr_scale['mask_token'] == lr_scale['decoder_pred.weight'] == 1.0
    assert lr_scale['encoder.norm.weight'] == 1.0


def test_reverse_cascade_trains_only_what_its_lrs_allow(mocov3_path, tmp_path):
    """--lr_layer_wise 0,1,1: the MoCo v3 blocks 0-1 stay to the bit, 2-5 and the decoder move."""
    argv = MAE + ['--graft_pretrained', str(mocov3_path), '--lr_layer_wise', '0,1,1']
    argv += '--batch_size 256 --epochs 1 --warmup_epochs 0 --blr 1e-3'.split()
    main_pretrain.main(parse(argv + ['--output_dir', str(tmp_path)]))
    moco = torch.load(mocov3_path, weights_only=True)['model']
    trained = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['model']
    for i in range(6):
        name = f'blocks.{i}.attn.qkv.weight'
        moved = not torch.equal(trained[f'encoder.{name}'], moco[f'base_encoder.{name}'])
        assert moved == (i >= 2), i


def test_graft_l1_pull_stays_mocov3s(mocov3_path):
    argv = MAE + ['--graft_pretrained', str(mocov3_path), '--graft_l1_weight', '1e-5']
    with pytest.raises(InputError, match='--graft_l1_weight is the official ViT-L pull'):
        main_pretrain.main(parse(argv))


# ------------------------------------------------------------ gradient conflict


def naive_cl_term(moco, view1, view2, i):
    """Sample i's term of MoCo v3's symmetrised InfoNCE, written out: -log softmax of its positive
    against the batch's keys, x 2T, for both query views."""
    z1 = moco.base_encoder(view1)  # the projector's BatchNorm over one view's batch
    z2 = moco.base_encoder(view2)
    q1 = F.normalize(moco.predictor(z1), dim=1)
    q2 = F.normalize(moco.predictor(z2), dim=1)
    with torch.no_grad():
        k1 = F.normalize(moco.momentum_encoder(view1), dim=1)
        k2 = F.normalize(moco.momentum_encoder(view2), dim=1)
    t = moco.temperature
    term = 0
    for q, k in ((q1, k2), (q2, k1)):
        logits = q[i] @ k.t() / t  # (B,)
        term = term + (torch.logsumexp(logits, 0) - logits[i]) * 2 * t
    return term


def naive_cosine(a: list, b: list) -> float:
    a = torch.cat([g.flatten() for g in a])
    b = torch.cat([g.flatten() for g in b])
    return (a @ b / (a.norm() * b.norm())).item()


def test_per_sample_cosine_equals_two_backward_passes():
    """The tool's C(x) of a sample equals the plain computation: the MAE loss of the image alone
    (MAE treats each image apart) and the written-out InfoNCE term of the image in its batch, each
    differentiated on its own by torch.autograd.grad; per block, embeddings and final norm."""
    model, batch = mtl_model_and_batch([], n=8)
    model.double().train()
    batch = tuple(t.double() for t in batch)
    view1, view2, mim_view, noise = batch
    rows = grad_conflict.encoder_rows(model.base_encoder)
    assert list(rows) == ['embed'] + [f'block {i}' for i in range(6)] + ['norm']
    cosines, mim_sum, cl_sum = grad_conflict.sample_cosines(model, batch, rows)  # (8, 8), (P,)
    assert cosines.shape == (8, 8)
    mim, cl = grad_conflict.sample_terms(model, *batch)
    torch.testing.assert_close(mim.sum(), model.mae(mim_view, noise)[0])
    torch.testing.assert_close(cl.mean(), model.moco(view1, view2)[0])
    for i in (0, 5):
        mim_alone = model.mae(mim_view[i : i + 1], noise[i : i + 1])[0]
        cl_term = naive_cl_term(model.moco, view1, view2, i)
        for r, params in enumerate(rows.values()):
            g_mim = torch.autograd.grad(mim_alone, params, retain_graph=True)
            g_cl = torch.autograd.grad(cl_term, params, retain_graph=True)
            expected = naive_cosine(g_mim, g_cl)
            assert cosines[i, r].item() == pytest.approx(expected, abs=1e-9), (i, r)
    assert cosines.std() > 0.01  # samples differ
    # The summed per-sample gradients are the gradients of the summed terms: the batch losses'.
    row_sizes = grad_conflict.row_sizes(rows)
    sums = grad_conflict.row_cosines(mim_sum, cl_sum, row_sizes)
    for r, params in enumerate(rows.values()):
        g_mim = torch.autograd.grad(mim.sum(), params, retain_graph=True)
        g_cl = torch.autograd.grad(cl.sum(), params, retain_graph=True)
        assert sums[r].item() == pytest.approx(naive_cosine(g_mim, g_cl), abs=1e-9), r


def test_mim_view_cl_feeds_mae_the_first_contrastive_view():
    """--mim_view cl: MAE's term is computed on MoCo v3's first view (the control), the default on
    the minimal view; the loader's batch is used as it comes."""
    model, batch = mtl_model_and_batch([], n=8)
    model.double().train()
    batch = tuple(t.double() for t in batch)
    view1, view2, minimal, noise = batch
    rows = grad_conflict.encoder_rows(model.base_encoder)
    loader = [(batch, torch.zeros(8))]
    for mim_view, seen in (('minimal', minimal), ('cl', view1)):
        cosines, sums = grad_conflict.conflict(model, loader, 6, 'cpu', mim_view)
        expected, mim_sum, cl_sum = grad_conflict.sample_cosines(
            model, (view1, view2, seen, noise), rows, 6
        )
        torch.testing.assert_close(cosines, expected)
        row_sizes = grad_conflict.row_sizes(rows)
        torch.testing.assert_close(sums, grad_conflict.row_cosines(mim_sum, cl_sum, row_sizes))
    assert not torch.equal(minimal, view1)


def test_grad_conflict_tool_on_an_mtl_checkpoint(tmp_path, capsys):
    """The architecture comes from the file (the depth control's 12 blocks), the random baseline
    is the default 6-block digits ViT; every row printed, the figure written."""
    out = tmp_path / 'mtl'
    argv = MTL + '--batch_size 256 --epochs 1 --knn_freq 0 --num_workers 0'.split()
    argv += ['--model', 'vit_digits_deep_patch4_16']
    main_pretrain.main(parse(argv + ['--output_dir', str(out)]))
    args = grad_conflict.get_args_parser().parse_args(
        ['--checkpoint', str(out / 'checkpoint-last.pth'), 'random', '--num_samples', '12']
        + '--batch_size 8 --num_workers 0 --moco_mlp_dim 64'.split()
        + ['--output', str(tmp_path / 'conflict.png')]
    )
    tables = grad_conflict.main(args)
    printed = capsys.readouterr().out
    assert 'heads from the file: all (MTL checkpoint' in printed
    assert 'heads from the file: none (all fresh)' in printed
    table = tables[str(out / 'checkpoint-last.pth')]
    assert [row[0] for row in table] == ['embed'] + [f'block {i}' for i in range(12)] + ['norm']
    assert len(tables['random initialisation']) == 8
    for name, median, q1, q3, negative, sum_cos in table:
        assert -1 <= q1 <= median <= q3 <= 1 and 0 <= negative <= 100, name
        assert -1 <= sum_cos <= 1, name
        assert f'{name:>8}  {median:>7.3f}' in printed
    assert os.path.getsize(tmp_path / 'conflict.png') > 1000
    # tools/conflict_table.py reads the printed output back, to the printed precision.
    panels = conflict_table.read_panels(printed)
    assert [p['path'] for p in panels] == [
        str(out / 'checkpoint-last.pth'),
        'random initialisation',
    ]
    for panel, table in zip(panels, tables.values()):
        assert panel['slope'] == pytest.approx(grad_conflict.median_slope(table), abs=5e-5)
        for name, median, q1, q3, negative, sum_cos in table:
            read = panel['rows'][name]
            assert read['median'] == pytest.approx(median, abs=5e-4)
            assert (read['q1'], read['q3']) == pytest.approx((q1, q3), abs=5e-4)
            assert read['neg'] == pytest.approx(negative, abs=0.05)
            assert read['sum'] == pytest.approx(sum_cos, abs=5e-4)


def test_median_slope_is_the_least_squares_line():
    table = [('embed', 9.0, 0, 0, 0, 0)]
    table += [(f'block {i}', 0.5 - 0.1 * i, 0, 0, 0, 0) for i in range(4)]
    assert grad_conflict.median_slope(table) == pytest.approx(-0.1)


def test_encoder_rows_cover_every_backbone_parameter():
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    vit.patch_embed.requires_grad_(False)
    rows = grad_conflict.encoder_rows(vit)
    covered = {id(p) for params in rows.values() for p in params}
    backbone = [p for n, p in vit.named_parameters() if not n.startswith('head.')]
    assert covered == {id(p) for p in backbone}
    assert all(p.requires_grad for p in backbone)


SEED_OUTPUT = """encoder: out/seed{s}/mtl/checkpoint-last.pth; heads from the file: all; 4 samples
     row   median       q1       q3   neg %  sum cos
   embed    {e:.3f}   -0.100    0.100    50.0    0.010
 block 0   -0.010   -0.030    0.020    {n:.1f}   -0.020
 block 1    {b:.3f}   -0.030    0.020    60.0    0.030
slope of the blocks' medians: {slope:+.4f} per block
plot: out/conflict.png
"""


def test_conflict_table_gives_mean_and_std_over_seeds(tmp_path, capsys):
    files = []
    for s, (e, n, b) in enumerate([(0.01, 50.0, 0.0), (0.03, 60.0, -0.02)]):
        path = tmp_path / f'seed{s}.txt'
        path.write_text(SEED_OUTPUT.format(s=s, e=e, n=n, b=b, slope=b + 0.01))
        files.append(str(path))
    args = conflict_table.get_args_parser().parse_args(files)
    medians = conflict_table.main(args).splitlines()
    assert medians[0].split(' | ')[1:4] == ['embed', 'block 0', 'block 1']
    # mean ± sample std (ddof 1): embed 0.02 ± 0.0141, block 1 -0.01 ± 0.0141, slope 0 ± 0.0141
    expected = '| mtl/checkpoint-last.pth | +0.020 ± 0.014 | -0.010 ± 0.000 | -0.010 ± 0.014 | '
    assert medians[2] == expected + '+0.0000 ± 0.0141 |'
    args.stat = 'neg'
    assert conflict_table.main(args).splitlines()[2].split(' | ')[2] == '55.0 ± 7.1'
    args.stat = 'sum'
    assert conflict_table.main(args).splitlines()[2].split(' | ')[1:3] == [
        '+0.010 ± 0.000',
        '-0.020 ± 0.000',
    ]
    capsys.readouterr()
    args.files.append(str(tmp_path / 'missing.txt'))
    with pytest.raises(InputError, match='cannot read .*missing.txt'):
        conflict_table.main(args)
