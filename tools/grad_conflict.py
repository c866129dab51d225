"""Gradient conflict between MIM and contrastive learning, per training sample and per block, as the
Layer Grafted paper measures it (Jiang et al., ICLR 2023, its introduction, box plot): for each
sample x, C(x) = <g_MIM(x), g_CL(x)> / (|g_MIM(x)| |g_CL(x)|), the gradients of x's MAE loss and of
x's MoCo v3 loss with respect to one block's parameters; its distribution per block. The official
repository released no code for it: how a per-sample CL gradient is defined is our reading
(docs/methods.md): the gradient of sample x's term of the batch loss, the batch supplying the
negatives and the projector's BatchNorm statistics. Each loss sees the views MTL trains it on
(MoCo v3's two, MAE's masked minimal view; `--mim_view cl`: MAE on MoCo v3's first view instead, a
control). Beside the per-sample distribution it prints the cosine of the two losses' gradients
summed over the samples (the directions a step on those samples takes; per-sample noise averages
out). The heads come from the file when it holds them (our MTL checkpoints hold all; MAE and MoCo
v3 files their own), else they are fresh; the output says which.
python -m tools.grad_conflict --checkpoint output/mtl/checkpoint-last.pth --num_samples 256"""

import argparse
import copy
import os

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: files only, no window

import main_pretrain
import models_mae
import models_mocov3
import models_mtl
from util import backbones, checkpoint, data, transforms
from util.errors import InputError, one_line, run_main
from util.masking import MaskNoiseGenerator

HEAD_FLAGS = ('decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'moco_dim', 'moco_mlp_dim')
# The heads' sizes: the checkpoint's (our saved args), else main_pretrain.py's defaults (= the
# official files'). {flag: its main_pretrain.py action}.
HEAD_SIZES = {a.dest: a for a in main_pretrain.get_args_parser()._actions if a.dest in HEAD_FLAGS}


def get_args_parser():
    p = argparse.ArgumentParser('MIM vs CL gradient conflict per sample and block', add_help=False)
    p.add_argument(
        '--checkpoint',
        nargs='+',
        default=['random'],
        help='one or more files, one panel each: an MTL checkpoint of ours, or any backbone '
        'util/backbones reads; random: a randomly initialised encoder (the baseline, default)',
    )
    p.add_argument(
        '--model', help="timm name of the encoder (default: the file's, else vit_digits_patch4_16)"
    )
    p.add_argument(
        '--num_samples', default=256, type=int, help='training images, one cosine per block each'
    )
    p.add_argument(
        '--batch_size',
        default=64,
        type=int,
        help='the batch that gives the CL negatives and BatchNorm statistics',
    )
    for name, action in HEAD_SIZES.items():
        p.add_argument(
            f'--{name}',
            default=None,
            type=int,
            help=f"{action.help} (default: the checkpoint's, else {action.default})",
        )
    p.add_argument(
        '--mim_view',
        default='minimal',
        choices=['minimal', 'cl'],
        help="the view MAE's loss sees: minimal (MTL's third view, as MTL trains it) or cl "
        "(MoCo v3's first view, the image the CL loss's query sees; a control)",
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
    p.add_argument('--output', default='output_dir/grad_conflict.png', help='the box plot')
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
    args', else main_pretrain.py's default), and MTL's views at the encoder's `input_size`."""
    resolved = dict(vars(args))
    for name, action in HEAD_SIZES.items():
        resolved[name] = getattr(args, name) or saved.get(name, action.default)
    resolved.update(method='mtl', crop_min=0.08, input_size=input_size)
    return argparse.Namespace(**resolved)


def build_mtl(encoder, args) -> models_mtl.MTL:
    """MTL's MAE decoder and MoCo v3 heads around `encoder`, whose weights stay as given."""
    weights = copy.deepcopy(encoder.state_dict())
    mae = models_mae.MAE(
        encoder,
        args.decoder_embed_dim,
        args.decoder_depth,
        args.decoder_num_heads,
        args.mask_ratio,
        args.norm_pix_loss,
    )
    encoder.load_state_dict(weights)  # MAE's own initialisation must not replace the weights
    moco = models_mocov3.MoCoV3(encoder, args.moco_dim, args.moco_mlp_dim, args.moco_t)
    return models_mtl.MTL(mae, moco)


def load_heads(state: dict, saved: dict, model: models_mtl.MTL, path: str) -> list:
    """Load each head the file holds, strictly (every key, every shape); returns the names of those
    loaded. An MTL checkpoint of ours loads whole (its momentum encoder too). InputError (with the
    flags to give) when a head's sizes differ from the file's."""
    if saved.get('method') == 'mtl':
        model.load_state_dict(state)
        return ['all (MTL checkpoint: decoder, projector, predictor, momentum encoder)']
    loaded = []
    # {name: (module, the prefix of its keys in the file)}; MAE's decoder keys have no prefix, as
    # in the official MAE files.
    heads = {
        'MAE decoder': (model.mae, ''),
        'MoCo v3 projector': (model.moco.base_encoder.head, 'base_encoder.head.'),
        'MoCo v3 predictor': (model.moco.predictor, 'predictor.'),
    }
    for what, (module, prefix) in heads.items():
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
    # The momentum (key) encoder starts as the loaded one, as in MoCo v3's training.
    model.moco.momentum_encoder.load_state_dict(model.moco.base_encoder.state_dict())
    return loaded


def encoder_rows(encoder) -> dict:
    """{row name: parameters}: 'embed' (patch and position embeddings, CLS token), each block, and
    'norm' (the final norm), every parameter of each, frozen ones too (set to require gradients
    here: the statistic is about the loss surface, not about what a run updates)."""
    rows = {'embed': [], **{f'block {i}': [] for i in range(len(encoder.blocks))}, 'norm': []}
    for name, param in encoder.named_parameters():
        if name.startswith('head.'):
            continue  # the MoCo v3 projector, not the backbone
        param.requires_grad_(True)
        if name.startswith('blocks.'):
            rows[f'block {name.split(".")[1]}'].append(param)
        elif name.startswith('norm.'):
            rows['norm'].append(param)
        else:
            rows['embed'].append(param)
    return {row: params for row, params in rows.items() if params}


def sample_terms(model: models_mtl.MTL, view1, view2, mim_view, noise) -> tuple:
    """(MIM terms (B,), CL terms (B,)): each sample's term of MTL's two batch losses."""
    mim = model.mae.image_losses(mim_view, noise)
    cl = model.moco.contrastive_loss(view1, view2, reduction='none')
    return mim, cl


def flat_grad(term: torch.Tensor, params: list) -> torch.Tensor:
    """The gradient of `term` w.r.t. `params` as one vector (zeros where none flows)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return torch.cat([g.flatten() for g in grads])


def row_sizes(rows: dict) -> list:
    """The number of parameter entries of each row, in order: how a flat gradient splits."""
    return [sum(p.numel() for p in row) for row in rows.values()]


def row_cosines(g_mim: torch.Tensor, g_cl: torch.Tensor, sizes: list) -> torch.Tensor:
    """Per row, the cosine between the rows' slices of two flat gradients: (rows,)."""
    pairs = zip(g_mim.split(sizes), g_cl.split(sizes))
    return torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in pairs])


def sample_cosines(model: models_mtl.MTL, batch: tuple, rows: dict, count: int = None) -> tuple:
    """C(x) per sample and row (count, rows) of the batch's first `count` samples (default all B):
    the cosine between the gradients of sample x's MIM term and of its CL term w.r.t. the row's
    parameters, two backward passes per sample; the whole batch gives the CL negatives. Also the
    sums over those samples of the MIM gradients and of the CL gradients, flat: (P,) each."""
    mim, cl = sample_terms(model, *batch)
    params = [p for row in rows.values() for p in row]
    sizes = row_sizes(rows)
    cosines = []
    mim_sum = 0
    cl_sum = 0
    for i in range(count or mim.shape[0]):
        g_mim = flat_grad(mim[i], params)
        g_cl = flat_grad(cl[i], params)
        cosines.append(row_cosines(g_mim, g_cl, sizes))
        mim_sum = mim_sum + g_mim
        cl_sum = cl_sum + g_cl
    return torch.stack(cosines).cpu(), mim_sum, cl_sum  # (count, rows), (P,), (P,)


def conflict(
    model: models_mtl.MTL, loader, num_samples: int, device, mim_view: str = 'minimal'
) -> tuple:
    """C(x) of the first `num_samples` training images, per row: (num_samples, rows); and per row
    the cosine of the two losses' gradients summed over those images: (rows,)."""
    model.train()  # as in training: the projector's BatchNorm on batch statistics
    rows = encoder_rows(model.base_encoder)
    sizes = row_sizes(rows)
    cosines = []
    mim_sum = 0
    cl_sum = 0
    seen = 0
    for inputs, _ in loader:
        view1, view2, minimal, noise = (t.to(device) for t in inputs)
        if mim_view == 'cl':
            minimal = view1
        count = min(num_samples - seen, view1.shape[0])
        batch_cosines, batch_mim, batch_cl = sample_cosines(
            model, (view1, view2, minimal, noise), rows, count
        )
        cosines.append(batch_cosines)
        mim_sum = mim_sum + batch_mim
        cl_sum = cl_sum + batch_cl
        seen += count
        if seen == num_samples:
            break
    return torch.cat(cosines), row_cosines(mim_sum, cl_sum, sizes).cpu()


def summary(cosines: torch.Tensor, sum_cosines: torch.Tensor, names: list) -> list:
    """Per row: (name, median, first quartile, third quartile, share of negatives in %, cosine of
    the summed gradients)."""
    q = torch.quantile(cosines, torch.tensor([0.5, 0.25, 0.75]), dim=0)  # (3, rows)
    negative = (cosines < 0).float().mean(dim=0) * 100
    return [
        (
            name,
            q[0, r].item(),
            q[1, r].item(),
            q[2, r].item(),
            negative[r].item(),
            sum_cosines[r].item(),
        )
        for r, name in enumerate(names)
    ]


def median_slope(table: list) -> float:
    """The slope of the least-squares line through the blocks' medians (per block)."""
    medians = torch.tensor([row[1] for row in table if row[0].startswith('block')])
    blocks = torch.arange(len(medians), dtype=torch.float32)
    blocks = blocks - blocks.mean()
    return float((blocks * (medians - medians.mean())).sum() / (blocks**2).sum())


def plot(panels: list, output: str) -> None:
    """One box plot per checkpoint (a box per row), with the blocks' medians' linear fit."""
    fig = Figure(figsize=(4 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, names, cosines, table) in zip(axes, panels):
        ax.boxplot(cosines.numpy(), showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), [n.removeprefix('block ') for n in names])
        blocks = [i + 1 for i, n in enumerate(names) if n.startswith('block')]
        medians = torch.tensor([row[1] for row in table if row[0].startswith('block')])
        slope = median_slope(table)
        centre = sum(blocks) / len(blocks)
        fit = [medians.mean().item() + slope * (b - centre) for b in blocks]
        ax.plot(blocks, fit, color='tab:red', linewidth=1, label=f'median fit {slope:+.3f}/block')
        ax.axhline(0, color='black', linewidth=0.6)
        ax.set(xlabel='row (embed, block, norm)', ylabel='cos(g_MIM(x), g_CL(x))')
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    fig.savefig(output, dpi=100)


def measure(path: str, args) -> tuple:
    """(row names, cosines (num_samples, rows), summed gradients' cosines (rows,), heads loaded) of
    the checkpoint at `path`."""
    torch.manual_seed(args.seed)
    state, saved = read_file(path)
    encoder = backbones.build_backbone(path, args.model)
    run = resolve_args(args, saved, encoder.patch_embed.img_size[0])
    model = build_mtl(encoder, run)
    loaded = load_heads(state, saved, model, path)
    model.to(args.device)
    noise = MaskNoiseGenerator(encoder.patch_embed.grid_size)
    dataset = data.build_dataset(run, True, transforms.pretrain_transform(run, noise))
    loader = data.build_loader(dataset, run, True)
    cosines, sum_cosines = conflict(model, loader, args.num_samples, args.device, args.mim_view)
    return list(encoder_rows(model.base_encoder)), cosines, sum_cosines, loaded


def main(args) -> dict:
    """Prints per checkpoint and row the median, quartiles and share of negative C(x); returns
    {checkpoint: its summary rows}."""
    panels = []
    tables = {}
    for path in args.checkpoint:
        if path == 'random':
            path = None
        names, cosines, sum_cosines, loaded = measure(path, args)
        table = summary(cosines, sum_cosines, names)
        source = path or 'random initialisation'
        heads = ', '.join(loaded) or 'none (all fresh)'
        samples = f'{len(cosines)} samples, MAE on the {args.mim_view} view'
        print(f'encoder: {source}; heads from the file: {heads}; {samples}')
        header = f'{"row":>8}  {"median":>7}  {"q1":>7}  {"q3":>7}  {"neg %":>6}  {"sum cos":>7}'
        print(header)
        for name, median, q1, q3, negative, sum_cos in table:
            quartiles = f'{median:>7.3f}  {q1:>7.3f}  {q3:>7.3f}'
            print(f'{name:>8}  {quartiles}  {negative:>6.1f}  {sum_cos:>7.3f}')
        print(f"slope of the blocks' medians: {median_slope(table):+.4f} per block")
        title = os.path.join(*source.split(os.sep)[-2:])
        panels.append((title, names, cosines, table))
        tables[source] = table
    plot(panels, args.output)
    print(f'plot: {args.output}')
    return tables


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        'MIM vs CL gradient conflict per sample and block', parents=[get_args_parser()]
    )
    run_main(main, parser.parse_args())
