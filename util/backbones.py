"""ViT backbones of any origin, read from checkpoint files (training state: util/checkpoint.py).

Backbones are recognised by the keys inside the file, never by its name:
- MoCo v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'},
  'arch': 'vit_small' | 'vit_base'}; 12 heads; `base_encoder.head` is its projector. Its main_lincls.py
  files: {'state_dict': {'module.<ViT keys>', 'module.head.*'}, 'arch'}; its convert_to_deit.py output
  {'model': ...} by its fixed sin-cos position table (MoCo v3's layout).
- DINO: a plain backbone state dict, or {'teacher': {'backbone.*', 'head.*'}, 'student': ...}.
- MAE: {'model': {..., 'decoder_*'}}, encoder-only by its fixed sin-cos table (MAE's layout); DeiT and
  fine-tuned files {'model': ...}; timm: a plain state dict; ours: {'model', 'args', 'num_heads', ...}.
"""

import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from util.architectures import DIGITS_MODEL, build_mlp  # registers our ViT names with timm
from util.checkpoint import load_file
from util.errors import InputError
from util.pos_embed import sincos_pos_embed

PATCH_KEY = 'patch_embed.proj.weight'
# Keys of a pre-training file that are not the backbone's (heads, decoders, mask tokens).
NON_BACKBONE = re.compile(r'^(head\.|fc_norm\.|mask_token|decoder_|decoder\.)')
# Heads of the usual ViTs by width (Ti, S, B, L, H of timm, DeiT, DINO, MAE), for files that do not say.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _wrapped_state_dict(path: str, checkpoint: dict, info: dict) -> tuple:
    """(state dict holding the ViT, key words of its prefix), filling info['format'/'num_heads'/'model']."""
    state = checkpoint.get('state_dict')
    if isinstance(state, dict) and (
        any('base_encoder' in k for k in state) or 'arch' in checkpoint
    ):
        arch = str(checkpoint.get('arch', 'vit_small'))
        if 'conv' in arch or not arch.startswith('vit'):
            raise InputError(
                f'{path} is a MoCo v3 {arch}: only the plain ViTs vit_small and vit_base '
                f'are supported (no convolutional stem, no ResNet)'
            )
        pretrain = any('base_encoder' in k for k in state)
        info.update(
            format='MoCo v3' if pretrain else 'MoCo v3 main_lincls.py', num_heads=12
        )  # vit_small too
        return state, ('base_encoder',)
    if isinstance(checkpoint.get('teacher'), dict):
        info['format'] = 'DINO'
        return checkpoint['teacher'], ('backbone',)
    if isinstance(checkpoint.get('model'), dict):
        sd, args = checkpoint['model'], checkpoint.get('args')
        if isinstance(args, dict):  # ours: args as a plain dict, the head count beside them
            info.update(
                format='ours', model=args.get('model'), num_heads=checkpoint.get('num_heads')
            )
        else:
            info['format'] = (
                'MAE' if any(k.startswith('decoder') for k in sd) else 'DeiT/fine-tuned'
            )
        return sd, ('base_encoder', 'student', 'encoder')
    has_head = any(k.startswith('head.') for k in checkpoint)
    info['format'] = (
        'DINO'
        if any(k.startswith('backbone.') for k in checkpoint)
        else ('timm' if has_head else 'DINO backbone')
    )
    return checkpoint, ('backbone',)


def fixed_sincos_layout(state_dict: dict) -> str:
    """'MoCo v3' or 'MAE' when the position embeddings are that code's fixed 2-D sin-cos table (never
    trained: a file of its pre-training or a conversion of one), else None."""
    pos = state_dict['pos_embed'][0].float()  # (prefix + N, D)
    num_prefix = 1 if 'cls_token' in state_dict else 0
    side = int(round((pos.shape[0] - num_prefix) ** 0.5))
    if side * side != pos.shape[0] - num_prefix or pos.shape[1] % 4:
        return None
    for layout in ('MoCo v3', 'MAE'):
        table = sincos_pos_embed((side, side), pos.shape[1], num_prefix, mae_layout=layout == 'MAE')
        if torch.allclose(pos, table[0], atol=1e-4):
            return layout
    return None


def read_backbone(path: str) -> tuple:
    """Returns (backbone state dict with timm ViT keys, projector state dict or None, info dict)."""
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict):
        raise InputError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
    info = {'num_heads': None, 'model': None}
    sd, prefer = _wrapped_state_dict(path, checkpoint, info)
    # The key prefix of the ViT, the first holding a word of `prefer` if any.
    prefixes = [k[: -len(PATCH_KEY)] for k in sd if k.endswith(PATCH_KEY)]
    prefix = next(
        (p for word in prefer for p in prefixes if word in p), prefixes[0] if prefixes else None
    )
    if prefix is None or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        some = ', '.join(list(sd)[:4])
        raise InputError(
            f'{path} holds no Vision Transformer (no *{PATCH_KEY}; keys start: {some}): '
            f'expected a MoCo v3, DINO, MAE, DeiT, timm ViT or mimco checkpoint'
        )
    backbone = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if 'pos_embed' not in backbone:
        kind = (
            'a BEiT/SimMIM-style ViT (relative position bias)'
            if any('relative_position' in k for k in backbone)
            else 'a ViT without position embeddings'
        )
        raise InputError(
            f'{path} holds {kind}, not a ViT with absolute position embeddings (pos_embed), '
            f'which is what these scripts load: use a MoCo v3, DINO, MAE, DeiT or timm vit_* file'
        )
    projector = {k[5:]: v for k, v in backbone.items() if k.startswith('head.') and v.ndim >= 1}
    if not any(k.endswith('running_mean') for k in projector):
        projector = None  # a classifier or nothing, not a MoCo v3 projector
    final_fc_norm = (
        'norm.weight' not in backbone
    )  # a global-pool fine-tuned file's final norm (MAE's, ours)

    def dropped(key: str) -> bool:
        return bool(NON_BACKBONE.match(key)) and not (final_fc_norm and key.startswith('fc_norm.'))

    skipped = sorted(k for k in backbone if dropped(k))
    backbone = {k: v for k, v in backbone.items() if not dropped(k)}
    # What the file holds besides the backbone, by top-level name (decoder_blocks, predictor, ...).
    outside = sorted(
        {
            k[len(prefix) :].split('.')[0]
            if k.startswith(prefix)
            else k.removeprefix('module.').split('.')[0]
            for k in sd
            if not k.startswith(prefix) or dropped(k[len(prefix) :])
        }
    )
    # May be an official pre-training's: MoCo v3's convert_to_deit.py output (its ViTs all have 12 heads).
    layout = (
        fixed_sincos_layout(backbone)
        if info['format'] in ('DeiT/fine-tuned', 'DINO backbone', 'timm')
        else None
    )
    if layout:
        info.update(
            {
                'MoCo v3': dict(format='MoCo v3 (convert_to_deit.py)', num_heads=12),
                'MAE': dict(format='MAE encoder'),
            }[layout]
        )
    info.update(prefix=prefix, skipped=skipped, outside=outside)
    return backbone, projector, info


def vit_kwargs(state_dict: dict, info: dict) -> dict:
    """The timm VisionTransformer that these weights came from, read off the tensors' shapes; the
    head count from the file's format when it tells, else that of the usual ViT of this width."""
    embed_dim, in_chans, _, patch_size = state_dict[PATCH_KEY].shape
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
    num_prefix = 1 if 'cls_token' in state_dict else 0
    grid = int(round((state_dict['pos_embed'].shape[1] - num_prefix) ** 0.5))
    return dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=info['num_heads'] or HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / embed_dim,
        qkv_bias='blocks.0.attn.qkv.bias' in state_dict,
        class_token=bool(num_prefix),
        global_pool='token' if num_prefix else 'avg',
        fc_norm='norm.weight' not in state_dict,
        init_values=1e-5 if 'blocks.0.ls1.gamma' in state_dict else None,
        num_classes=0,
    )


def _check_fit(
    state_dict: dict, model: VisionTransformer, info: dict, path: str, flag: str
) -> None:
    """Refuse a file the model does not fit, or whose head count it contradicts: heads change no shape,
    so a wrong count would load silently."""
    heads, built = info['num_heads'], model.blocks[0].attn.num_heads
    if heads and heads != built:
        name = info['model'] or (
            'mocov3_vit_small' if heads == 12 and model.embed_dim == 384 else None
        )
        fix = f'{flag} {name}' if name else f'a {flag} with {heads} heads'
        raise InputError(
            f'{path} is a {info["format"]} ViT with {heads} attention heads, but {flag} '
            f'builds one with {built}: use {fix}, or leave {flag} out to build it from the file'
        )
    if 'fc_norm.weight' in state_dict and isinstance(model.fc_norm, torch.nn.Identity):
        model.fc_norm, model.norm = (
            model.norm,
            torch.nn.Identity(),
        )  # the file's final norm follows the pooling
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    wrong = [
        f'{k} {tuple(state_dict[k].shape)} in the file vs {tuple(expected[k].shape)} in the model'
        for k in expected
        if k in state_dict and k != 'pos_embed' and state_dict[k].shape != expected[k].shape
    ]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or wrong or unexpected:
        found = vit_kwargs(state_dict, {'num_heads': None})
        problems = '; '.join(
            wrong[:3]
            + [f'missing {", ".join(missing[:4])}'] * bool(missing)
            + [f'unexpected {", ".join(unexpected[:4])}'] * bool(unexpected)
        )
        raise InputError(
            f'{path} does not fit the model: {problems}. The file holds a ViT with '
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
        kwargs = {**vit_kwargs(state_dict, info), **({'img_size': img_size} if img_size else {})}
        if info['model']:
            model = timm.create_model(
                info['model'], num_classes=0, img_size=kwargs['img_size'], **model_kwargs
            )
        else:
            model = VisionTransformer(**kwargs, **model_kwargs)
            usual = "the usual ViT's" if kwargs['embed_dim'] in HEADS_BY_WIDTH else 'width / 64'
            guessed = (
                ''
                if info['num_heads']
                else (
                    f'; {kwargs["num_heads"]} attention heads assumed (the file does not say; {usual} at width '
                    f'{kwargs["embed_dim"]}): give {flag} to build another'
                )
            )
    _check_fit(state_dict, model, info, path, flag)
    if state_dict['pos_embed'].shape != model.pos_embed.shape:
        # Plain bicubic, as MAE's and DeiT's interpolate_pos_embed (timm's default antialiases).
        state_dict['pos_embed'] = resample_abs_pos_embed(
            state_dict['pos_embed'],
            new_size=model.patch_embed.grid_size,
            num_prefix_tokens=model.num_prefix_tokens,
            antialias=False,
            verbose=verbose,
        )
    model.load_state_dict(state_dict)
    if verbose:
        print(
            f'loaded the backbone of {path} ({info["format"]} format, prefix {info["prefix"]!r}); not part '
            f'of the backbone: {", ".join(info["outside"]) or "nothing"}{guessed}'
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
    name = name or (None if path else DIGITS_MODEL)
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = (
                timm.create_model(
                    name, num_classes=0, **({'img_size': img_size} if img_size else {}), **kwargs
                )
                if name
                else None
            )
    except RuntimeError as e:
        raise InputError(f'{flag} {name}: {e}') from None
    if path:
        model = load_backbone(path, model, img_size=img_size, flag=flag, **kwargs)
    size, patch = model.patch_embed.img_size[0], model.patch_embed.patch_size[0]
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
    shapes = [
        v.shape
        for k, v in sorted(projector.items(), key=lambda kv: int(kv[0].split('.')[0]))
        if k.endswith('weight') and v.ndim == 2
    ]
    head = build_mlp(len(shapes), shapes[0][1], shapes[0][0], shapes[-1][0])
    head.load_state_dict(projector)
    return head.eval()
