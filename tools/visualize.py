"""Pictures and separability of pre-trained backbones, side by side (PNG files; docs/pictures.md):
tsne.png, t-SNE maps of the val features titled with the val top-1 of a logistic regression on the
frozen train features and the Fisher ratio (both also printed); attention.png, the last block's CLS
attention; mae_reconstruction_<name>.png / mimco_masks_<name>.png for our MAE / MimCo checkpoints;
separability.json, {name: {'logreg': top-1 %, 'fisher': Fisher ratio}}.
python -m tools.visualize --checkpoints random output/demo/mocov3/checkpoint-last.pth \
    --output_dir output/demo/pictures
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.manifold import TSNE

import models_vit
import pretrain_setup
from engine_finetune import extract_features
from util import checkpoint, data, features, figures, masking, transforms
from util.errors import InputError, run_main


def get_args_parser():
    p = argparse.ArgumentParser('mimco pictures and separability', add_help=False)
    p.add_argument(
        '--checkpoints',
        nargs='+',
        default=['random'],
        help='backbones (any format util/backbones reads), `random` for the random-init baseline '
        'of --model; each is a t-SNE panel, an attention row',
    )
    p.add_argument(
        '--names',
        nargs='+',
        help='a short name per checkpoint (default: its folder name, or random)',
    )
    p.add_argument(
        '--model',
        help="timm name (default: each file's architecture; vit_digits_patch4_16 for random)",
    )
    p.add_argument('--output_dir', default='output_dir/pictures', help='where the PNG files go')
    p.add_argument(
        '--num_images', default=8, type=int, help='val images in the attention and MAE/MimCo rows'
    )
    p.add_argument('--perplexity', default=30.0, type=float, help='t-SNE perplexity')
    p.add_argument(
        '--tsne_iters', default=1000, type=int, help='t-SNE optimisation steps (at least 250)'
    )
    p.add_argument(
        '--logreg_iters',
        default=200,
        type=int,
        help='L-BFGS steps of the logistic regression (its accuracy settles long before 1000)',
    )
    p.add_argument(
        '--max_points', default=2000, type=int, help='val images in the t-SNE maps at most (seeded)'
    )
    data.add_data_args(p, subsets=False)
    p.add_argument(
        '--batch_size', default=256, type=int, help='images per feature-extraction batch'
    )
    p.add_argument('--num_workers', default=0, type=int, help='data loader workers')
    p.add_argument('--seed', default=0, type=int, help='random seed (random init, t-SNE, masks)')
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu'
    )
    # What engine_finetune.extract_features reads besides the flags above.
    p.set_defaults(amp='none', print_freq=1000)
    return p


def frozen_features(backbone, args, device, is_train: bool) -> tuple:
    """(features (N, D), labels (N,)) of the train or val split, at the eval transform."""
    dataset = data.build_dataset(args, is_train, transforms.eval_transform(args))
    return extract_features(backbone, dataset, device, args)


def logreg_accuracy(train_x, train_y, val_x, val_y, iters: int) -> float:
    """Val top-1 (%) of Layer Grafted's logistic regression on all the frozen train features."""
    train_n, val_n = features.center_normalize(train_x, val_x)
    classifier = features.logistic_regression(
        train_n, train_y, int(train_y.max()) + 1, 2.5e-4 / len(train_n), iters
    )
    return (classifier(val_n.double()).argmax(1) == val_y).double().mean().item() * 100


def fisher_ratio(val_x, val_y) -> float:
    """tr(S_between) / tr(S_within), between- over within-class scatter (Fisher, 1936) of the
    features, centred and L2-normalised so that the ratio does not depend on their scale."""
    x = F.normalize(val_x - val_x.mean(0, keepdim=True), dim=1).double()  # (N, D)
    onehot = F.one_hot(val_y).double()  # (N, C)
    class_means = onehot.T @ x / onehot.sum(0).clamp(min=1)[:, None]  # (C, D)
    # The sum over classes of n_c |mean_c - mean|^2, as a sum over samples.
    between = (class_means[val_y] - x.mean(0)).square().sum()
    return (between / (x - class_means[val_y]).square().sum()).item()


def separability(backbone, args, device) -> tuple:
    """(val features, val labels, logreg val top-1 %, Fisher ratio) of the frozen backbone."""
    train_x, train_y = frozen_features(backbone, args, device, is_train=True)
    val_x, val_y = frozen_features(backbone, args, device, is_train=False)
    accuracy = logreg_accuracy(train_x, train_y, val_x, val_y, args.logreg_iters)
    fisher = fisher_ratio(val_x, val_y)
    return val_x.cpu(), val_y.cpu(), accuracy, fisher


def method_pictures(path: str, name: str, backbone, images, args) -> list:
    """MAE reconstructions / MimCo masks for our own MAE / MimCo checkpoints; the files written."""
    saved = {}
    if path != 'random':
        saved = checkpoint.load_file(path)
    # Our checkpoints save the pre-training args: the method and its masking.
    run = {}
    if isinstance(saved, dict) and isinstance(saved.get('args'), dict):
        run = saved['args']
    if run.get('method') not in figures.MASKING_NAMES:
        return []
    if run['method'] == 'mae':
        # The weights come from the file: a reverse cascade's first stage need not be read again.
        mae = pretrain_setup.build_model(argparse.Namespace(**{**run, 'graft_pretrained': None}))[0]
        mae.load_state_dict(saved['model'])
        masker = dict(mae=mae.to(images.device).eval())
    else:
        grid = backbone.patch_embed.grid_size
        mask_generator = masking.build_mask_generator(run['mask_type'], grid, run['mask_ratio'])
        masker = dict(mask_generator=mask_generator)
    file_name = f'{figures.MASKING_NAMES[run["method"]]}_{name.replace(" ", "_")}.png'
    out = os.path.join(args.output_dir, file_name)
    patch_size = backbone.patch_embed.patch_size[0]
    figures.save(figures.masking_figure(images, patch_size, args.seed, **masker), out)
    return [out]


def default_name(path: str) -> str:
    """'random init', or the checkpoint's folder name (its file name where the folder has none)."""
    if path == 'random':
        return 'random init'
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder or os.path.basename(path)


def tsne_panel(title: str, val_x, val_y, args) -> tuple:
    """(title, (n, 2) t-SNE map, (n,) labels) of at most --max_points val features, seeded."""
    keep = np.random.default_rng(args.seed).permutation(len(val_x))[: args.max_points]
    tsne = TSNE(
        n_components=2,
        perplexity=min(args.perplexity, (len(keep) - 1) / 3),
        init='pca',
        max_iter=args.tsne_iters,
        random_state=args.seed,
    )
    embedding = tsne.fit_transform(F.normalize(val_x[keep], dim=1).numpy())
    return title, embedding, val_y[keep].numpy()


def main(args):
    names = args.names or [default_name(path) for path in args.checkpoints]
    if len(names) != len(args.checkpoints):
        raise InputError(
            f'--names gives {len(names)} names for {len(args.checkpoints)} --checkpoints: '
            f'give one per checkpoint, or leave --names out'
        )
    if args.num_images < 1 or args.max_points < 10:
        raise InputError('--num_images must be at least 1 and --max_points at least 10')
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device(args.device)
    panels = []
    maps = {}
    written = [os.path.join(args.output_dir, f) for f in ('tsne.png', 'attention.png')]
    scores = {}
    for path, name in zip(args.checkpoints, names):
        torch.manual_seed(args.seed)  # the random-init baseline is the same every run
        backbone = features.frozen_backbone(path, args.model, None, False, args.seed).to(device)
        # The data at this backbone's input size.
        backbone_args = argparse.Namespace(**vars(args))
        backbone_args.input_size = backbone.patch_embed.img_size[0]
        val_x, val_y, accuracy, fisher = separability(backbone, backbone_args, device)
        print(
            f'separability | {name} | logreg val top-1 {accuracy:.1f} % | Fisher ratio {fisher:.3f}'
        )
        scores[name] = {'logreg': accuracy, 'fisher': fisher}
        title = f'{name}\nlogreg {accuracy:.1f} %, Fisher {fisher:.2f}'
        panels.append(tsne_panel(title, val_x, val_y, args))
        images = figures.sample_images(backbone_args, args.num_images).to(device)
        maps[name] = models_vit.cls_attention(backbone, images)
        written += method_pictures(path, name, backbone, images, args)
    figures.save(figures.tsne_figure(panels), written[0])
    figures.save(figures.attention_figure(images, maps), written[1])
    written.append(os.path.join(args.output_dir, 'separability.json'))
    with open(written[-1], 'w') as f:
        json.dump(scores, f, indent=1)
    print('wrote ' + ', '.join(written))
    return written


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco pictures and separability', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
