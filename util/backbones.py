"""ViT backbones of any origin, read from checkpoint files (training state: util/checkpoint.py).

Backbones are recognised by the keys inside the file, never by its name:
- MoCo v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
  'module.predictor.*'}, 'arch': 'vit_small' | 'vit_base'}; 12 heads; `base_encoder.head` is its
  projector. main_lincls.py: {'state_dict': {'module.<ViT keys>', 'module.head.*'}, 'arch'};
  convert_to_deit.py: {'model': ...}, told by its fixed sin-cos position table (MoCo v3's layout).
- DINO: a plain backbone state dict, or {'teacher': {'backbone.*', 'head.*'}, 'student': ...}.
- MAE: {'model': {..., 'decoder_*'}}, encoder-only by its fixed sin-cos table (MAE's layout); DeiT
  and fine-tuned: {'model': ...}; timm: a plain state dict; ours: {'model', 'args', 'num_heads'}.
"""

import re

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from util.architectures import build_mlp, default_model  # registers our ViT names with timm
from util.checkpoint import fit_problems, load_file
from util.errors import InputError
from util.pos_embed import resample_pos_embed, sincos_pos_embed

PATCH_KEY = 'patch_embed.proj.weight'
# Keys of a pre-training file that are not the backbone's (heads, decoders, mask tokens).
NON_BACKBONE = re.compile(r'^(head\.|fc_norm\.|mask_token|decoder_|decoder\.)')
# The usual ViTs' heads by width (Ti, S, B, L, H of timm, DeiT, DINO, MAE), for files not saying.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _mocov3_state_dict(path: str, checkpoint: dict, info: dict) -> tuple:
    """A MoCo v3 file's state dict (pre-training or main_lincls.py), refusing its ResNets."""
    state = checkpoint['state_dict']
    arch = str(checkpoint.get('arch', 'vit_small'))
    if 'conv' in arch or not arch.startswith('vit'):
        raise InputError(
            f'{path} is a MoCo v3 {arch}: only the plain ViTs vit_small and vit_base '
            f'are supported (no convolutional stem, no ResNet)'
        )
    if any('base_encoder' in k for k in state):
        info['format'] = 'MoCo v3'
    else:
        info['format'] = 'MoCo v3 main_lincls.py'
    # MoCo v3 gives every ViT 12 heads, vit_small too (timm's has 6).
    info['num_heads'] = 12
    return state, ('base_encoder',)


def _wrapped_state_dict(path: str, checkpoint: dict, info: dict) -> tuple:
    """(state dict holding the ViT, words its key prefix may hold, most wanted first), by the
    wrapper around it; fills info['format'], and info['num_heads'] / info['model'] where the
    format tells them."""
    state = checkpoint.get('state_dict')
    if isinstance(state, dict):
        if any('base_encoder' in k for k in state) or 'arch' in checkpoint:
            return _mocov3_state_dict(path, checkpoint, info)
    if isinstance(checkpoint.get('teacher'), dict):
        info['format'] = 'DINO'
        return checkpoint['teacher'], ('backbone',)
    if isinstance(checkpoint.get('model'), dict):
        state = checkpoint['model']
        args = checkpoint.get('args')
        if isinstance(args, dict):
            # Ours: args as a plain dict, the head count beside them.
            info['format'] = 'ours'
            info['model'] = args.get('model')
            info['num_heads'] = checkpoint.get('num_heads')
        elif any(k.startswith('decoder') for k in state):
            info['format'] = 'MAE'
        else:
            info['format'] = 'DeiT/fine-tuned'
        return state, ('base_encoder', 'student', 'encoder')
    # A plain state dict.
    if any(k.startswith('backbone.') for k in checkpoint):
        info['format'] = 'DINO'
    elif any(k.startswith('head.') for k in checkpoint):
        info['format'] = 'timm'
    else:
        info['format'] = 'DINO backbone'
    return checkpoint, ('backbone',)


def _num_prefix_tokens(state_dict: dict) -> int:
    """The tokens before the patch tokens in pos_embed: the class token, if the ViT has one."""
    if 'cls_token' in state_dict:
        return 1
    return 0


def _grid_side(state_dict: dict) -> int:
    """The side of the square patch grid that pos_embed (1, prefix + N, D) covers."""
    num_patches = state_dict['pos_embed'].shape[1] - _num_prefix_tokens(state_dict)
    return int(round(num_patches**0.5))


def fixed_sincos_layout(state_dict: dict) -> str:
    """'MoCo v3' or 'MAE' when the position embeddings are that code's fixed 2-D sin-cos table
    (never trained: a file of its pre-training or a conversion of one), else None."""
    pos = state_dict['pos_embed'][0].float()  # (prefix + N, D)
    num_prefix = _num_prefix_tokens(state_dict)
    side = _grid_side(state_dict)
    # A 2-D sin-cos table needs a square grid and a width that splits into sin and cos per axis.
    if side * side != pos.shape[0] - num_prefix or pos.shape[1] % 4:
        return None
    for layout in ('MoCo v3', 'MAE'):
        mae_layout = layout == 'MAE'
        table = sincos_pos_embed((side, side), pos.shape[1], num_prefix, mae_layout=mae_layout)
        if torch.allclose(pos, table[0], atol=1e-4):
            return layout
    return None


def _vit_prefix(state_dict: dict, prefer: tuple) -> str:
    """The key prefix of the ViT: the first holding a word of `prefer` (in its order), else the
    first found; None when no key is a patch embedding."""
    prefixes = [k[: -len(PATCH_KEY)] for k in state_dict if k.endswith(PATCH_KEY)]
    for word in prefer:
        for prefix in prefixes:
            if word in prefix:
                return prefix
    if prefixes:
        return prefixes[0]
    return None


def _is_dropped(key: str, keep_fc_norm: bool) -> bool:
    """Whether a key of the ViT is not the backbone's (NON_BACKBONE); `keep_fc_norm` keeps fc_norm,
    the final norm of a global-pool fine-tuned file."""
    if keep_fc_norm and key.startswith('fc_norm.'):
        return False
    return bool(NON_BACKBONE.match(key))


def _outside_backbone(state_dict: dict, prefix: str, keep_fc_norm: bool) -> list:
    """What the file holds besides the backbone, by top-level name (decoder_blocks, predictor)."""
    names = set()
    for key in state_dict:
        if not key.startswith(prefix):
            names.add(key.removeprefix('module.').split('.')[0])
        elif _is_dropped(key[len(prefix) :], keep_fc_norm):
            names.add(key[len(prefix) :].split('.')[0])
    return sorted(names)


def read_backbone(path: str) -> tuple:
    """Returns (backbone state dict with timm ViT keys, projector state dict or None, info dict).

    info: 'format' (the file's origin, see above), 'num_heads' and 'model' (None where the file
    does not tell), 'prefix' of the ViT's keys in the file, 'skipped' (its keys left out of the
    backbone: heads, decoder, mask token), 'outside' (the top-level names of the rest) and
    'classifier' ({'weight' (C, D), 'bias' (C,)} of a Linear head, else None). Raises
    InputError for a file that holds no ViT with absolute position embeddings.
    """
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict):
        raise InputError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
    info = {'num_heads': None, 'model': None}
    state_dict, prefer = _wrapped_state_dict(path, checkpoint, info)
    prefix = _vit_prefix(state_dict, prefer)
    if prefix is None or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        some = ', '.join(list(state_dict)[:4])
        raise InputError(
            f'{path} holds no Vision Transformer (no *{PATCH_KEY}; keys start: {some}): '
            f'expected a MoCo v3, DINO, MAE, DeiT, timm ViT or mimco checkpoint'
        )
    backbone = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if 'pos_embed' not in backbone:
        if any('relative_position' in k for k in backbone):
            kind = 'a BEiT/SimMIM-style ViT (relative position bias)'
        else:
            kind = 'a ViT without position embeddings'
        raise InputError(
            f'{path} holds {kind}, not a ViT with absolute position embeddings (pos_embed), '
            f'which is what these scripts load: use a MoCo v3, DINO, MAE, DeiT or timm vit_* file'
        )
    projector = {k[5:]: v for k, v in backbone.items() if k.startswith('head.') and v.ndim >= 1}
    classifier = None
    if not any(k.endswith('running_mean') for k in projector):
        projector = None  # a classifier or nothing, not a MoCo v3 projector
        if set(backbone) >= {'head.weight', 'head.bias'} and backbone['head.weight'].ndim == 2:
            classifier = {'weight': backbone['head.weight'], 'bias': backbone['head.bias']}
    # Without `norm`, fc_norm is the final norm of a global-pool fine-tuned file (MAE's, ours).
    keep_fc_norm = 'norm.weight' not in backbone
    skipped = sorted(k for k in backbone if _is_dropped(k, keep_fc_norm))
    backbone = {k: v for k, v in backbone.items() if not _is_dropped(k, keep_fc_norm)}
    outside = _outside_backbone(state_dict, prefix, keep_fc_norm)
    # A file that does not say where it comes from may be an official pre-training's, told by its
    # fixed sin-cos table: MoCo v3's convert_to_deit.py output (its ViTs all have 12 heads) or an
    # MAE encoder.
    if info['format'] in ('DeiT/fine-tuned', 'DINO backbone', 'timm'):
        layout = fixed_sincos_layout(backbone)
        if layout == 'MoCo v3':
            info['format'] = 'MoCo v3 (convert_to_deit.py)'
            info['num_heads'] = 12
        elif layout == 'MAE':
            info['format'] = 'MAE encoder'
    info.update(prefix=prefix, skipped=skipped, outside=outside, classifier=classifier)
    return backbone, projector, info


def vit_kwargs(state_dict: dict, info: dict) -> dict:
    """The timm VisionTransformer that these weights came from, read off the tensors' shapes; the
    head count from the file's format when it tells, else that of the usual ViT of this width."""
    embed_dim, in_chans, _, patch_size = state_dict[PATCH_KEY].shape  # (D, C, p, p)
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
    num_prefix = _num_prefix_tokens(state_dict)
    # No shape tells the head count.
    num_heads = info['num_heads'] or HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
    global_pool = 'avg'
    if num_prefix:
        global_pool = 'token'
    # The file's LayerScale gammas overwrite init_values; a value only switches LayerScale on.
    init_values = None
    if 'blocks.0.ls1.gamma' in state_dict:
        init_values = 1e-5
    return dict(
        img_size=_grid_side(state_dict) * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / embed_dim,
        qkv_bias='blocks.0.attn.qkv.bias' in state_dict,
        class_token=bool(num_prefix),
        global_pool=global_pool,
        fc_norm='norm.weight' not in state_dict,
        init_values=init_values,
        num_classes=0,
    )


def move_norm_after_pooling(model: VisionTransformer) -> None:
    """The final norm moves after the pooling (fc_norm), where a global-pool fine-tuned file (MAE's,
    ours) holds it; nothing changes when fc_norm is already a norm."""
    if isinstance(model.fc_norm, torch.nn.Identity):
        model.fc_norm = model.norm
        model.norm = torch.nn.Identity()


def _check_heads(model: VisionTransformer, info: dict, path: str, flag: str) -> None:
    """Refuse a model whose head count the file contradicts: heads change no shape, so a wrong
    count would load silently."""
    heads = info['num_heads']
    built = model.blocks[0].attn.num_heads
    if not heads or heads == built:
        return
    name = info['model']
    if not name and heads == 12 and model.embed_dim == 384:
        name = 'mocov3_vit_small'
    if name:
        fix = f'{flag} {name}'
    else:
        fix = f'a {flag} with {heads} heads'
    raise InputError(
        f'{path} is a {info["format"]} ViT with {heads} attention heads, but {flag} '
        f'builds one with {built}: use {fix}, or leave {flag} out to build it from the file'
    )


def _check_fit(
    state_dict: dict, model: VisionTransformer, info: dict, path: str, flag: str
) -> None:
    """Refuse a file the model does not fit, or whose head count it contradicts."""
    _check_heads(model, info, path, flag)
    if 'fc_norm.weight' in state_dict:
        move_norm_after_pooling(model)
    # pos_embed is resampled to the model's grid after this check.
    problems = fit_problems(state_dict, model.state_dict(), resampled=('pos_embed',))
    if problems:
        found = vit_kwargs(state_dict, {'num_heads': None})
        raise InputError(
            f'{path} does not fit the model: {"; ".join(problems)}. The file holds a ViT with '
            f'embed_dim {found["embed_dim"]}, depth {found["depth"]}, patch '
            f'{found["patch_size"]}, {found["in_chans"]} channels: pick the matching '
            f'{flag} (or leave it out to infer it from the file)'
        )


def load_backbone(
    path: str,
    model: VisionTransformer = None,
    img_size: int = None,
    flag: str = '--model',
    verbose: bool = True,
    **model_kwargs,
) -> VisionTransformer:
    """A timm VisionTransformer in eval() holding the backbone weights of `path` (any format above).

    `model=None` builds the architecture the file holds (with `model_kwargs`, e.g. drop_path_rate);
    `img_size` resamples the position embeddings to another grid. `forward_features(x)` then gives
    final-normed tokens (B, 1+N, D), except for a global-pool fine-tuned file, whose final norm
    (`fc_norm`) comes after the pooling in `forward_head`.
    """
    state_dict, _, info = read_backbone(path)
    guessed = ''
    if model is None:
        kwargs = vit_kwargs(state_dict, info)
        if img_size:
            kwargs['img_size'] = img_size
        if info['model']:
            model = timm.create_model(
                info['model'], num_classes=0, img_size=kwargs['img_size'], **model_kwargs
            )
        else:
            model = VisionTransformer(**kwargs, **model_kwargs)
            if not info['num_heads']:
                usual = 'width / 64'
                if kwargs['embed_dim'] in HEADS_BY_WIDTH:
                    usual = "the usual ViT's"
                guessed = (
                    f'; {kwargs["num_heads"]} attention heads assumed (the file does not say; '
                    f'{usual} at width {kwargs["embed_dim"]}): give {flag} to build another'
                )
    _check_fit(state_dict, model, info, path, flag)
    if state_dict['pos_embed'].shape != model.pos_embed.shape:
        state_dict['pos_embed'] = resample_pos_embed(
            state_dict['pos_embed'],
            model.patch_embed.grid_size,
            model.num_prefix_tokens,
            dino_rule=info['format'].startswith('DINO'),
        )
    model.load_state_dict(state_dict)
    if verbose:
        outside = ', '.join(info['outside']) or 'nothing'
        print(
            f'loaded the backbone of {path} ({info["format"]} format, prefix {info["prefix"]!r}); '
            f'not part of the backbone: {outside}{guessed}'
        )
    return model.eval()


def build_backbone(
    path: str = None,
    name: str = None,
    img_size: int = None,
    seed: int = None,
    flag: str = '--model',
    **kwargs,
) -> VisionTransformer:
    """A timm ViT without classifier: `name` (default: the architecture `path` holds, DIGITS_MODEL
    without `path`) at `img_size`, with the backbone weights of `path` (any format above) or random,
    drawn from `seed` alone when given (the global stream untouched); `kwargs` go to timm."""
    name = default_model(name, path)
    size_kwargs = {}
    if img_size:
        size_kwargs['img_size'] = img_size
    model = None
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if name:
                model = timm.create_model(name, num_classes=0, **size_kwargs, **kwargs)
    except RuntimeError as e:
        raise InputError(f'{flag} {name}: {e}') from None
    if path:
        model = load_backbone(path, model, img_size=img_size, flag=flag, **kwargs)
    size = model.patch_embed.img_size[0]
    patch = model.patch_embed.patch_size[0]
    if size % patch:
        raise InputError(
            f'--input_size {size} is not a multiple of the patch size {patch} of {flag} '
            f'{name}: use e.g. {size // patch * patch}'
        )
    return model


def load_projector(path: str) -> torch.nn.Module:
    """The MoCo v3 projector (`base_encoder.head`) in `path`, or None when it has none."""
    projector = read_backbone(path)[1]
    if projector is None:
        return None
    # The keys start with the layer's index in build_mlp's Sequential: sort by it, not as text.
    layers = sorted(projector.items(), key=lambda item: int(item[0].split('.')[0]))
    shapes = [v.shape for k, v in layers if k.endswith('weight') and v.ndim == 2]  # (out, in)
    head = build_mlp(len(shapes), shapes[0][1], shapes[0][0], shapes[-1][0])
    head.load_state_dict(projector)
    return head.eval()
