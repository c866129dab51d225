"""Gradient conflict between MIM and contrastive learning, block by block (the Layer Grafted
paper's motivating observation, Jiang et al., 2023, Sec. 1): the cosine similarity between the
gradients of the MAE loss and of the MoCo v3 loss on the *same* encoder weights. The decoder (MAE)
and the projector and predictor (MoCo v3) come from the checkpoint when it holds them (ours,
official MAE, official MoCo v3), else they are freshly initialised; the output says which.
python -m tools.grad_conflict --checkpoint output/mae/checkpoint-last.pth"""

import argparse
import copy
import itertools
import os

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: files only, no window

import main_pretrain
import models_mae
import models_mocov3
from util import backbones, checkpoint, data, transforms
from util.errors import InputError, one_line, run_main

HEAD_FLAGS = ('decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'moco_dim', 'moco_mlp_dim')
# The heads' sizes: the checkpoint's (our saved args), else main_pretrain.py's defaults (= the
# official files'). {flag: its main_pretrain.py action}.
HEAD_SIZES = {a.dest: a for a in main_pretrain.get_args_parser()._actions if a.dest in HEAD_FLAGS}


def get_args_parser():
    p = argparse.ArgumentParser('MIM vs CL gradient conflict per block', add_help=False)
    p.add_argument(
        '--checkpoint',
        default=None,
        type=str,
        help='encoder weights (any format util/backbones '
        'reads; default: none, a randomly initialised encoder, the baseline)',
    )
    p.add_argument(
        '--model', help="timm name of the encoder (default: the file's, else vit_digits_patch4_16)"
    )
    p.add_argument('--batch_size', default=128, type=int, help='images per batch')
    p.add_argument('--num_batches', default=4, type=int, help='batches whose gradients are summed')
    for name, action in HEAD_SIZES.items():
        p.add_argument(
            f'--{name}',
            default=None,
            type=int,
            help=f"{action.help} (default: the checkpoint's, else {action.default})",
        )
    p.add_argument('--moco_t', default=0.2, type=float, help='MoCo v3 temperature')
    p.add_argument('--mask_ratio', default=0.75, type=float, help='MAE mask ratio')
    p.add_argument(
        '--norm_pix_loss',
        default=True,
        action=argparse.BooleanOptionalAction,
        help='MAE target: pixels normalised per patch',
    )
    data.add_data_args(p, subsets=False)
    p.add_argument('--num_workers', default=2, type=int, help='data loader workers')
    p.add_argument('--output', default='output_dir/grad_conflict.png', type=str, help='the plot')
    p.add_argument('--seed', default=0, type=int, help='random seed (heads, masks, augmentations)')
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu'
    )
    return p


def read_file(path: str) -> tuple:
    """(state dict without 'module.', the args saved with it) of the checkpoint at `path`; both
    empty without a checkpoint or for a file that is not a dict."""
    raw = {}
    if path:
        raw = checkpoint.load_file(path)
    if not isinstance(raw, dict):
        raw = {}
    saved = raw.get('args')
    if not isinstance(saved, dict):
        saved = {}
    state = raw.get('model', raw.get('state_dict', {}))
    return {k.removeprefix('module.'): v for k, v in state.items()}, saved


def resolve_args(args, saved: dict, input_size: int) -> argparse.Namespace:
    """A copy of `args` with what the run needs: each head's size (the flag's, else the saved
    args', else main_pretrain.py's default), and the data of MoCo v3's two views (MIM takes the
    first) at the encoder's `input_size`."""
    resolved = dict(vars(args))
    for name, action in HEAD_SIZES.items():
        resolved[name] = getattr(args, name) or saved.get(name, action.default)
    resolved.update(method='mocov3', crop_min=0.08, input_size=input_size)
    return argparse.Namespace(**resolved)


def load_heads(state: dict, mae: models_mae.MAE, moco: models_mocov3.MoCoV3, path: str) -> list:
    """Load each head the file holds, strictly (every key, every shape); returns the names of those
    loaded. InputError (with the flags to give) when a head's sizes differ from the file's."""
    loaded = []
    # {name: (module, the prefix of its keys in the file)}
    heads = {
        'MAE decoder': (mae, ''),
        'MoCo v3 projector': (moco.base_encoder.head, 'base_encoder.head.'),
        'MoCo v3 predictor': (moco.predictor, 'predictor.'),
    }
    for what, (module, prefix) in heads.items():
        # The MAE's keys have no prefix: its decoder's keys, named as in official MAE files.
        starts = prefix or ('decoder', 'mask_token')
        found = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(starts)}
        if not found:
            continue
        # The MAE's own encoder weights stay: the file gives the head only.
        encoder = {k: v for k, v in module.state_dict().items() if k.startswith('encoder.')}
        try:
            module.load_state_dict({**encoder, **found})
        except RuntimeError as e:
            detail = one_line(e).split('. ')[0][:200]  # the first mismatch
            raise InputError(
                f'the {what} in {path} does not fit the one built here ({detail}): give the '
                f'sizes it was trained with (--decoder_embed_dim/--decoder_depth/'
                f'--decoder_num_heads, --moco_dim/--moco_mlp_dim)'
            ) from None
        loaded.append(what)
    # The momentum (key) encoder and projector start as the loaded ones, as in MoCo v3's training.
    moco.momentum_encoder.load_state_dict(moco.base_encoder.state_dict())
    return loaded


def block_gradients(vit) -> list:
    """Each block's gradient as one flat vector."""
    return [torch.cat([p.grad.flatten() for p in block.parameters()]) for block in vit.blocks]


def per_block_cosine(mae, moco, loader, num_batches: int, device) -> tuple:
    """(cosines, |g_MIM|, |g_CL|) per block, gradients summed over `num_batches` batches."""
    mae.train()
    moco.train()
    for (view1, view2), _ in itertools.islice(loader, num_batches):
        view1 = view1.to(device)
        view2 = view2.to(device)
        mae(view1)[0].backward()  # MIM gradients accumulate in mae.encoder
        moco(view1, view2, m=1.0)[0].backward()  # m = 1: the key encoder stays the loaded weights
    g_mim = block_gradients(mae.encoder)
    g_cl = block_gradients(moco.base_encoder)
    cosines = [F.cosine_similarity(a, b, dim=0).item() for a, b in zip(g_mim, g_cl)]
    return cosines, [g.norm().item() for g in g_mim], [g.norm().item() for g in g_cl]


def plot(cosines: list, source: str, output: str) -> None:
    """A bar per block, red where the two gradients conflict (negative cosine), to `output`."""
    ax = Figure(figsize=(5, 3)).subplots()
    colors = ['tab:red' if c < 0 else 'tab:blue' for c in cosines]
    ax.bar(range(len(cosines)), cosines, color=colors)
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set(xlabel='block', ylabel='cos(grad MIM, grad CL)')
    ax.set_title(f'MIM vs CL gradient per block\n{os.path.basename(source)}', fontsize=9)
    ax.figure.tight_layout()
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    ax.figure.savefig(output, dpi=120)


def main(args) -> list:
    torch.manual_seed(args.seed)
    state, saved = read_file(args.checkpoint)
    encoder = backbones.build_backbone(args.checkpoint, args.model)
    args = resolve_args(args, saved, encoder.patch_embed.img_size[0])
    mae = models_mae.MAE(
        copy.deepcopy(encoder),
        args.decoder_embed_dim,
        args.decoder_depth,
        args.decoder_num_heads,
        args.mask_ratio,
        args.norm_pix_loss,
    )
    mae.encoder.load_state_dict(encoder.state_dict())  # MAE's own init must not replace the weights
    moco = models_mocov3.MoCoV3(
        copy.deepcopy(encoder), args.moco_dim, args.moco_mlp_dim, args.moco_t
    )
    loaded = load_heads(state, mae, moco, args.checkpoint)
    mae.to(args.device)
    moco.to(args.device)
    dataset = data.build_dataset(args, True, transforms.pretrain_transform(args))
    loader = data.build_loader(dataset, args, True)
    cosines, norm_mim, norm_cl = per_block_cosine(mae, moco, loader, args.num_batches, args.device)
    source = args.checkpoint or 'random initialisation'
    heads = ', '.join(loaded) or 'none (all fresh)'
    print(f'encoder: {source}; trained heads from the file: {heads}')
    print(f'{"block":>5}  {"cos(MIM, CL)":>12}  {"|g_MIM|":>9}  {"|g_CL|":>9}')
    for i, (c, a, b) in enumerate(zip(cosines, norm_mim, norm_cl)):
        print(f'{i:>5}  {c:>12.4f}  {a:>9.3e}  {b:>9.3e}')
    plot(cosines, source, args.output)
    print(f'plot: {args.output}')
    return cosines


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        'MIM vs CL gradient conflict per block', parents=[get_args_parser()]
    )
    run_main(main, parser.parse_args())
