"""Layer Grafted Pre-training's stage 2 (Jiang et al., ICLR 2023): the MoCo v3 encoder starts from
the stage-1 MIM encoder, and three contiguous groups of blocks train at their own learning rates."""

import re

from timm.optim import param_groups_weight_decay

from util import backbones
from util.errors import InputError

BLOCK_INDEX = re.compile(r'(?:^|\.)blocks\.(\d+)\.')
EMBEDDINGS = re.compile(r'(?:^|\.)(cls_token|reg_token|pos_embed|patch_embed|norm_pre)(?:\.|$)')


def graft_encoder(path: str, encoder, freeze_blocks: int = 0) -> None:
    """Layer Grafted stage 2 (Jiang et al., 2023, Sec. 3): the encoder starts from the stage-1 (MIM)
    encoder in `path`, its patch and position embeddings frozen, and with `freeze_blocks` N also
    the CLS token and the first N blocks (the official --fixTo). load_backbone raises on any
    missing block."""
    backbones.load_backbone(path, encoder, flag='--model')
    encoder.train()
    depth = len(encoder.blocks)
    if not 0 <= freeze_blocks <= depth:
        raise InputError(
            f'--graft_freeze_blocks {freeze_blocks}: the encoder has {depth} '
            f'blocks, pick 0..{depth}'
        )
    frozen = [encoder.patch_embed, encoder.pos_embed]
    frozen_names = 'patch_embed, pos_embed'
    if freeze_blocks:
        frozen += [encoder.cls_token, encoder.blocks[:freeze_blocks]]
        frozen_names += f', cls_token, blocks 0..{freeze_blocks - 1}'
    for part in frozen:
        part.requires_grad_(False)
    print(f'grafted {depth} blocks from {path}; frozen: {frozen_names}')


def parse_lr_layer_wise(text: str) -> list:
    """--lr_layer_wise 'a,b,c': the lr multipliers of the three groups of blocks, bottom first."""
    try:
        multipliers = [float(v) for v in text.split(',')]
    except ValueError:
        multipliers = []
    if len(multipliers) != 3 or any(m < 0 for m in multipliers):
        raise InputError(
            f'--lr_layer_wise {text!r}: give three non-negative lr multipliers, one per '
            f"third of the blocks from the bottom, e.g. 0.1,0.1,1 (the paper's ViT-B setting)"
        )
    return multipliers


def block_index(name: str) -> int:
    """The encoder block a parameter belongs to, -1 outside the blocks."""
    found = BLOCK_INDEX.search(name)
    if not found:
        return -1
    return int(found.group(1))


def graft_group(name: str, depth: int, num_groups: int) -> int:
    """The group of contiguous blocks a parameter trains with: a block's own; the embeddings with
    the first; everything else (final norm, projector, predictor) with the last."""
    block = block_index(name)
    if block >= 0:
        blocks_per_group = depth // num_groups
        return block // blocks_per_group
    if EMBEDDINGS.search(name):
        return 0
    return num_groups - 1


def graft_param_groups(
    model, multipliers: list, weight_decay: float, no_weight_decay_list=()
) -> list:
    """timm's weight-decay groups, each split by `graft_group`, with `lr_scale` = the group's
    multiplier (timm's schedulers multiply each group's lr by its `lr_scale`)."""
    # timm's groups hold the parameters, not their names: find the names by identity.
    names = {id(p): n for n, p in model.named_parameters()}
    depth = 1 + max(block_index(n) for n in names.values())
    if depth == 0 or depth % len(multipliers):
        raise InputError(
            f'--lr_layer_wise splits the blocks into {len(multipliers)} equal groups, but '
            f'the encoder has {depth} blocks: pick a --model whose depth is divisible by '
            f'{len(multipliers)} (e.g. 6, 12, 24)'
        )
    decay_groups = param_groups_weight_decay(
        model, weight_decay, no_weight_decay_list=no_weight_decay_list
    )
    groups = []
    for decay_group in decay_groups:
        by_graft_group = {}
        for param in decay_group['params']:
            group = graft_group(names[id(param)], depth, len(multipliers))
            by_graft_group.setdefault(group, []).append(param)
        for group, params in sorted(by_graft_group.items()):
            groups.append(
                {
                    'params': params,
                    'weight_decay': decay_group['weight_decay'],
                    'lr_scale': multipliers[group],
                    'graft_group': group,
                }
            )
    return groups
