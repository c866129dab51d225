"""Gradient conflict between MIM and contrastive learning, block by block (the Layer Grafted paper's
motivating observation, Jiang et al., 2023, Sec. 1): the cosine similarity between the gradients of the
MAE loss and of the MoCo v3 loss on the *same* encoder weights. The decoder (MAE) and the projector and
predictor (MoCo v3) come from the checkpoint when it holds them (ours, official MAE, official MoCo v3),
else they are freshly initialised; the output says which.
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

# The heads' sizes: the checkpoint's (our saved args), else main_pretrain.py's defaults (= the official files').
HEAD_SIZES = {
    a.dest: a
    for a in main_pretrain.get_args_parser()._actions
    if a.dest
    in ('decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'moco_dim', 'moco_mlp_dim')
}


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


def read_file(args) -> dict:
    """The checkpoint's state dict without 'module.' (empty without one); fills the unset head sizes."""
    raw = checkpoint.load_file(args.checkpoint) if args.checkpoint else {}
    raw = raw if isinstance(raw, dict) else {}
    saved = raw['args'] if isinstance(raw.get('args'), dict) else {}
    for name, action in HEAD_SIZES.items():
        setattr(args, name, getattr(args, name) or saved.get(name, action.default))
    return {
        k.removeprefix('module.'): v for k, v in raw.get('model', raw.get('state_dict', {})).items()
    }


def load_heads(state: dict, mae: models_mae.MAE, moco: models_mocov3.MoCoV3, path: str) -> list:
    """Load each head the file holds, strictly (every key, every shape); returns the names of those loaded."""
    loaded = []
    heads = {
        'MAE decoder': (mae, ''),
        'MoCo v3 projector': (moco.base_encoder.head, 'base_encoder.head.'),
        'MoCo v3 predictor': (moco.predictor, 'predictor.'),
    }  # module, the prefix of its keys in the file
    for what, (module, prefix) in heads.items():
        starts = prefix or (
            'decoder',
            'mask_token',
        )  # the MAE's: its decoder's keys, named as in official files
        found = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(starts)}
        if not found:
            continue
        encoder = {
            k: v for k, v in module.state_dict().items() if k.startswith('encoder.')
        }  # the MAE's own
        try:
            module.load_state_dict({**encoder, **found})
        except RuntimeError as e:
            detail = one_line(e).split('. ')[0][:200]  # the first mismatch
            raise InputError(
                f'the {what} in {path} does not fit the one built here ({detail}): give the sizes it '
                f'was trained with (--decoder_embed_dim/--decoder_depth/--decoder_num_heads, '
                f'--moco_dim/--moco_mlp_dim)'
            ) from None
        loaded.append(what)
    moco.momentum_encoder.load_state_dict(
        moco.base_encoder.state_dict()
    )  # the key projector = the loaded one
    return loaded


def per_block_cosine(mae, moco, loader, num_batches: int, device) -> tuple:
    """(cosines, |g_MIM|, |g_CL|) per block, gradients summed over `num_batches` batches."""
    mae.train(), moco.train()
    for (view1, view2), _ in itertools.islice(loader, num_batches):
        view1, view2 = view1.to(device), view2.to(device)
        mae(view1)[0].backward()  # MIM gradients accumulate in mae.encoder
        moco(view1, view2, m=1.0)[0].backward()  # m = 1: the key encoder stays the loaded weights
    g_mim, g_cl = (
        [torch.cat([p.grad.flatten() for p in block.parameters()]) for block in vit.blocks]
        for vit in (mae.encoder, moco.base_encoder)
    )  # each block's gradient as one flat vector
    cosines = [F.cosine_similarity(a, b, dim=0).item() for a, b in zip(g_mim, g_cl)]
    return cosines, [g.norm().item() for g in g_mim], [g.norm().item() for g in g_cl]


def main(args) -> list:
    torch.manual_seed(args.seed)
    state = read_file(args)
    encoder = backbones.build_backbone(args.checkpoint, args.model)
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
    mae.to(args.device), moco.to(args.device)
    args.method, args.crop_min = 'mocov3', 0.08  # two views; MIM takes the first
    args.input_size = encoder.patch_embed.img_size[0]
    loader = data.build_loader(
        data.build_dataset(args, True, transforms.pretrain_transform(args)), args, True
    )
    cosines, norm_mim, norm_cl = per_block_cosine(mae, moco, loader, args.num_batches, args.device)
    source = args.checkpoint or 'random initialisation'
    print(
        f'encoder: {source}; trained heads from the file: {", ".join(loaded) or "none (all fresh)"}'
    )
    print(f'{"block":>5}  {"cos(MIM, CL)":>12}  {"|g_MIM|":>9}  {"|g_CL|":>9}')
    for i, (c, a, b) in enumerate(zip(cosines, norm_mim, norm_cl)):
        print(f'{i:>5}  {c:>12.4f}  {a:>9.3e}  {b:>9.3e}')
    ax = Figure(figsize=(5, 3)).subplots()
    ax.bar(
        range(len(cosines)), cosines, color=['tab:red' if c < 0 else 'tab:blue' for c in cosines]
    )
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set(xlabel='block', ylabel='cos(grad MIM, grad CL)')
    ax.set_title(f'MIM vs CL gradient per block\n{os.path.basename(source)}', fontsize=9)
    ax.figure.tight_layout()
    os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
    ax.figure.savefig(args.output, dpi=120)
    print(f'plot: {args.output}')
    return cosines


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        'MIM vs CL gradient conflict per block', parents=[get_args_parser()]
    )
    run_main(main, parser.parse_args())
