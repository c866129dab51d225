"""Evaluation protocols: kNN and logistic regression against references, label subsets, and real
runs of main_finetune.py / main_linprobe.py on digits with a tiny ViT."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from timm.models.vision_transformer import VisionTransformer

import engine_probe
import main_finetune
import main_linprobe
from util import backbones, data, features, subsets, transforms
from util.architectures import build_mlp
from util.digits import Digits
from util.errors import InputError
from util.lars import lars
from util.logging import setup_run

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def run(module, *argv):
    """A script's main() on a command line."""
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    return module.main(parser.parse_args([str(a) for a in argv]))


def clustered(n_train: int, n_test: int, dim: int, classes: int, seed: int) -> tuple:
    """Gaussian blobs around random class means, split train/test: a learnable, imperfect task."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = means[y] + 1.5 * torch.randn(n_train + n_test, dim, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ------------------------------------------------------------ references


def test_knn_matches_brute_force():
    train_x, train_y, test_x, test_y = clustered(300, 70, 16, 5, seed=0)
    k, t = 20, 0.07
    scores = features.knn_scores(train_x, train_y, test_x, 5, k, t, chunk=16)  # 5 blocks
    # Naive reference: one test image at a time, full sort of cosine similarities,
    # votes summed in a loop.
    a = train_x.numpy() / np.linalg.norm(train_x.numpy(), axis=1, keepdims=True)
    expected = np.zeros((70, 5))
    for i, q in enumerate(test_x.numpy()):
        sim = a @ (q / np.linalg.norm(q))
        for j in np.argsort(-sim)[:k]:
            expected[i, train_y[j]] += np.exp(sim[j] / t)
    expected[expected == 0] = -np.inf  # no vote: no prediction
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)
    assert torch.equal(scores.argmax(1), torch.from_numpy(expected.argmax(1)))
    assert torch.equal(scores, features.knn_scores(train_x, train_y, test_x, 5, k, t, chunk=1000))
    assert 40 < (scores.argmax(1) == test_y).float().mean() * 100 < 100  # a real, imperfect task


def test_logreg_matches_sklearn():
    train_x, train_y, test_x, test_y = clustered(150, 100, 12, 4, seed=1)
    train_x, test_x = features.center_normalize(train_x, test_x)
    wd = 0.01
    ours = features.logistic_regression(train_x, train_y, 4, wd)
    # sklearn minimises C * sum_i CE_i + |W|^2 / 2, ours mean_i CE_i + wd / 2 |W|^2: C = 1 / (wd n).
    ref = LogisticRegression(
        C=1 / (wd * len(train_y)), fit_intercept=False, tol=1e-10, max_iter=10000
    )
    ref.fit(train_x.double().numpy(), train_y.numpy())
    np.testing.assert_allclose(ours.weight.numpy(), ref.coef_, atol=2e-4)
    # Rows centred on their own mean, unit length (cyanure's per-row preprocessing).
    torch.testing.assert_close(train_x.mean(1), torch.zeros(len(train_x)))
    torch.testing.assert_close(train_x.norm(dim=1), torch.ones(len(train_x)))
    pred = ours(test_x.double()).argmax(1).numpy()
    assert (pred == ref.predict(test_x.double().numpy())).all()
    assert 40 < (pred == test_y.numpy()).mean() * 100 < 100


# ------------------------------------------------------------ label subsets


def subset_args(tmp_path, **kwargs):
    base = dict(
        subset_file=None,
        train_fraction=None,
        shots_per_class=None,
        subset_draw_index=0,
        seed=0,
        output_dir=str(tmp_path),
    )
    return argparse.Namespace(**{**base, **kwargs})


def test_train_fraction_is_stratified_seeded_and_saved(tmp_path):
    digits = Digits(train=True)
    subset = subsets.label_subset(digits, subset_args(tmp_path, train_fraction=0.1))
    counts, full = (
        np.bincount(subset.targets, minlength=10),
        np.bincount(digits.targets, minlength=10),
    )
    assert (np.abs(counts - 0.1 * full) <= 0.5).all() and counts.sum() == len(subset.indices)
    assert (
        subsets.label_subset(digits, subset_args(tmp_path / 'b', train_fraction=0.1)).indices
        == subset.indices
    )
    assert (
        subsets.label_subset(
            digits, subset_args(tmp_path / 'c', train_fraction=0.1, seed=1)
        ).indices
        != subset.indices
    )
    # The saved list repeats the run.
    saved = tmp_path / 'subset.txt'
    again = subsets.label_subset(digits, subset_args(tmp_path / 'd', subset_file=str(saved)))
    assert again.indices == subset.indices and saved.read_text().splitlines()[0].startswith(
        'digits_'
    )
    shots = subsets.label_subset(digits, subset_args(tmp_path / 'e', shots_per_class=3))
    assert (np.bincount(shots.targets) == 3).all()
    with pytest.raises(InputError, match='only one'):
        subsets.label_subset(digits, subset_args(tmp_path, train_fraction=0.1, shots_per_class=3))


def image_folder(root, size: int = 8, per_class: int = 4):
    """An ImageNet-layout folder: train/ and val/, classes n001 and n002, files <wnid>_<i>.JPEG."""
    for c, wnid in enumerate(('n001', 'n002')):
        for split in ('train', 'val'):
            os.makedirs(root / split / wnid)
            for i in range(per_class):
                color = (i * 60, 200 * c, 0)
                Image.new('RGB', (size, size), color=color).save(
                    root / split / wnid / f'{wnid}_{i}.JPEG'
                )
    return root


def test_subset_file_reads_simclr_list(tmp_path):
    root = image_folder(tmp_path / 'data')
    listing = tmp_path / '1percent.txt'
    listing.write_text('n001_2.JPEG\n\nn002_0.JPEG\nn002_3.JPEG\n')
    args = subset_args(
        tmp_path / 'out', subset_file=str(listing), data_path=str(root), dataset='auto'
    )
    subset = subsets.label_subset(data.build_dataset(args, True, None), args)
    names = [os.path.basename(subset.dataset.samples[i][0]) for i in subset.indices]
    assert names == ['n001_2.JPEG', 'n002_0.JPEG', 'n002_3.JPEG'] and subset.targets == [0, 1, 1]
    assert (tmp_path / 'out' / 'subset.txt').read_text().split() == names
    listing.write_text('n001_2.JPEG\nn009_1.JPEG\n')
    with pytest.raises(InputError, match='n009_1.JPEG'):
        subsets.label_subset(data.build_dataset(args, True, None), args)


# ------------------------------------------------------------ real runs on digits


@pytest.fixture(scope='session')
def pretrained(teacher_path):
    """The session's short MoCo v3 run on digits (tests/conftest.py): the pre-trained backbone the
    protocols must tell from random."""
    return os.path.join(teacher_path, 'checkpoint-last.pth')


def probe(tmp_path, checkpoint, protocol, *extra):
    return run(
        main_linprobe,
        '--checkpoint',
        checkpoint,
        '--protocol',
        protocol,
        '--num_workers',
        0,
        '--print_freq',
        1000,
        '--output_dir',
        tmp_path / f'{protocol}{len(os.listdir(tmp_path))}',
        *extra,
    )


@pytest.mark.slow
def test_protocols_tell_pretrained_from_random(tmp_path, pretrained):
    results = {}
    for name, ckpt in (('random', 'random'), ('mocov3', pretrained)):
        results[name] = {
            'linear': probe(tmp_path, ckpt, 'linear', '--epochs', 30, '--warmup_epochs', 3)['acc1'],
            'knn': probe(tmp_path, ckpt, 'knn')['acc1'],
            'logreg10': probe(tmp_path, ckpt, 'logreg', '--train_fraction', 0.1)['acc1'],
        }
    print(json.dumps(results))
    for protocol in ('linear', 'knn', 'logreg10'):
        assert results['mocov3'][protocol] > results['random'][protocol] + 5, (protocol, results)
    log = [json.loads(line) for line in open(tmp_path / 'knn1' / 'log.txt')]
    assert log[-1]['summary'] == 'knn' and log[-1]['args']['knn_k'] == 20


def test_linear_probe_leaves_backbone_identical(tmp_path):
    """The per-epoch image path (no cache): the backbone runs inside the trained module."""
    args = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()]).parse_args(
        [
            '--checkpoint',
            'random',
            '--epochs',
            '8',
            '--protocol',
            'lincls_mocov3',
            '--blr',
            '0.5',
            '--num_workers',
            '0',
            '--no-cache_features',
            '--shots_per_class',
            '20',
            '--batch_size',
            '50',
            '--output_dir',
            str(tmp_path),
        ]
    )
    device = setup_run(args)
    main_linprobe.resolve_args(args, digits=True)
    backbone = features.frozen_backbone(
        args.checkpoint, args.model, args.input_size, args.global_pool, args.seed
    )
    args.input_size = backbone.patch_embed.img_size[0]  # as main_linprobe.main records it
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_set = subsets.label_subset(
        data.build_dataset(args, True, transforms.eval_transform(args)), args
    )
    val_set = data.build_dataset(args, False, transforms.eval_transform(args))
    metrics = engine_probe.linear_probe(backbone, train_set, val_set, 10, device, args)
    # The head did learn: chance is 10 %; 20-23 % measured at blr 0.1 to 2 (random backbone).
    assert not backbone.training and metrics['acc1'] > 15, metrics
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_lars_adapts_weights_at_zero_weight_decay():
    """MAE's probe (LARS, weight decay 0): the weight's first step is lr * 0.001 |w| / |g| * g, the
    bias's plain lr * g; timm's Lars on its own would take the plain SGD step for both."""
    torch.manual_seed(0)
    head = engine_probe.linear_head(16, 10)
    head[1].bias.data.normal_()
    weight, bias = head[1].weight.detach().clone(), head[1].bias.detach().clone()
    optimizer = lars([{'params': list(head.parameters()), 'weight_decay': 0.0}], lr=6.4)
    head(torch.randn(32, 16)).logsumexp(1).mean().backward()
    grad_w, grad_b = head[1].weight.grad.clone(), head[1].bias.grad.clone()
    optimizer.step()
    trust = 0.001 * weight.norm() / grad_w.norm()
    torch.testing.assert_close(head[1].weight.detach(), weight - 6.4 * trust * grad_w)
    torch.testing.assert_close(head[1].bias.detach(), bias - 6.4 * grad_b)


def test_finetune_from_scratch_learns_and_keeps_best(tmp_path):
    out = tmp_path / 'ft'
    metrics = run(
        main_finetune,
        '--epochs',
        4,
        '--warmup_epochs',
        1,
        '--blr',
        2e-3,
        '--layer_decay',
        1,
        '--drop_path',
        0,
        '--batch_size',
        64,
        '--num_workers',
        0,
        '--print_freq',
        1000,
        '--output_dir',
        out,
    )
    assert metrics['best_acc1'] > 25, metrics  # chance is 10 %; 38 % measured
    again = run(
        main_finetune,
        '--eval',
        '--resume',
        out / 'checkpoint-best.pth',
        '--num_workers',
        0,
        '--output_dir',
        tmp_path / 'eval',
    )
    assert again['acc1'] == pytest.approx(metrics['best_acc1'])


def official_mocov3(tmp_path, with_projector: bool = True):
    """A tiny ViT saved as MoCo v3's official files are: module.base_encoder.* with its projector
    as `head`, a momentum encoder and a predictor; 12 heads as read_backbone assumes."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=96, depth=2, num_heads=12, num_classes=0
    )
    vit.head = build_mlp(3, 96, 64, 32)
    torch.nn.init.uniform_(vit.norm.weight)  # not LayerNorm's default, so loading it shows
    sd = {f'module.base_encoder.{k}': v for k, v in vit.state_dict().items()}
    sd.update({f'module.momentum_encoder.{k}': v.clone() for k, v in vit.state_dict().items()})
    sd.update(
        {f'module.predictor.{k}': v for k, v in build_mlp(2, 32, 64, 32).state_dict().items()}
    )
    path = tmp_path / 'vit_small.pth.tar'
    torch.save({'state_dict': sd, 'arch': 'vit_small', 'epoch': 300}, path)
    plain = tmp_path / 'plain.pth'
    torch.save({k: v for k, v in vit.state_dict().items() if not k.startswith('head')}, plain)
    return vit, path, plain


def finetune_backbone(args):
    """main_finetune.main's backbone: --finetune's weights (any format) or random, no classifier."""
    return backbones.build_backbone(
        args.finetune, args.model, args.input_size, drop_path_rate=args.drop_path
    )


def test_finetune_reads_official_mocov3_format(tmp_path):
    vit, path, plain = official_mocov3(tmp_path)
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args(
        ['--finetune', str(path), '--init_from_projector', '--output_dir', str(tmp_path / 'out')]
    )
    model = main_finetune.add_classifier(finetune_backbone(args), args, 10)
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model.blocks[0].attn.num_heads == 12 and torch.equal(
        model.fc_norm.weight, vit.norm.weight
    )
    assert torch.equal(model.head[0].weight, vit.head[0].weight)  # (64, 96) from the projector
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # At another resolution: the 4x4 grid of positions resampled to 8x8.
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args(
        ['--finetune', str(path), '--input_size', '32', '--output_dir', str(tmp_path / 'out32')]
    )
    model = finetune_backbone(args)
    assert args.input_size == 32 and model.pos_embed.shape == (1, 1 + 64, 96)
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    # A pre-training file holds no classifier: --eval would score a fresh random head.
    with pytest.raises(InputError, match='holds no classifier'):
        run(main_finetune, '--finetune', path, '--eval', '--output_dir', tmp_path / 'eval')
    with pytest.raises(InputError, match='projector'):
        run(
            main_finetune,
            '--finetune',
            plain,
            '--init_from_projector',
            '--num_workers',
            0,
            '--output_dir',
            tmp_path / 'bad',
        )


def test_imagefolder_paths_run_the_full_recipe(tmp_path):
    """ImageNet-style data: RandAugment + erasing + Mixup/CutMix for fine-tuning, per-epoch crops
    through the frozen backbone for the linear probe."""
    root = image_folder(tmp_path / 'data', size=24, per_class=8)
    args = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args(
        ['--data_path', str(root), '--input_size', '16']
    )
    main_finetune.set_dataset_defaults(args)
    train_set = data.build_dataset(args, True, None)
    train_set.transform = transforms.finetune_view(args)
    shown = repr(train_set.transform)
    assert (
        'RandAugment' in shown
        and 'RandomErasing' in shown
        and (args.mixup, args.cutmix) == (0.8, 1.0)
    )
    short = '--input_size 16 --epochs 1 --batch_size 8 --num_workers 0'.split()
    metrics = run(main_finetune, '--data_path', root, *short, '--output_dir', tmp_path / 'ft')
    assert metrics['n_train'] == 16 and 0 <= metrics['acc1'] <= 100
    metrics = run(main_linprobe, '--data_path', root, *short, '--output_dir', tmp_path / 'lin')
    log = [json.loads(line) for line in open(tmp_path / 'lin' / 'log.txt')]
    assert log[-1]['args']['cache_features'] is False and metrics['n_val'] == 16
