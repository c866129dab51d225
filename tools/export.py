"""Export a pre-trained backbone (any file util/backbones reads: ours, MoCo v3, DINO, MAE, timm) as
a plain timm state dict, exactly the keys of timm's ViT without a classifier, checked by loading it
through timm and comparing features with `util.backbones.load_backbone` on the original file
(docs/checkpoints.md shows how to load it):
python -m tools.export --checkpoint output/demo/mimco/checkpoint-last.pth \
    --output mimco_digits.pth"""

import argparse
import os

import timm
import torch

from util import backbones
from util.errors import InputError, run_main


def get_args_parser():
    p = argparse.ArgumentParser('export a backbone as a timm state dict', add_help=False)
    p.add_argument(
        '--checkpoint',
        required=True,
        type=str,
        help='backbone to export (any format util/backbones reads)',
    )
    p.add_argument(
        '--output',
        default='output_dir/backbone_timm.pth',
        type=str,
        help='the plain state dict to write',
    )
    p.add_argument(
        '--model',
        default=None,
        type=str,
        help='timm name the weights are for (default: the name saved in our checkpoints; '
        'official MoCo v3 ViT-S: mocov3_vit_small, which has its 12 heads)',
    )
    p.add_argument(
        '--check',
        default=True,
        action=argparse.BooleanOptionalAction,
        help='load the file with timm.create_model(..., pretrained=True) and compare features',
    )
    return p


def feature_difference(name: str, path: str, img_size: int, fc_norm: bool, reference) -> float:
    """The largest |difference| between the features of timm's `name` loaded from the plain state
    dict at `path` (as a user of the file loads it) and `reference`'s, on two seeded random images
    of the file's own image size."""
    exported = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=os.path.abspath(path)),
        num_classes=0,
        img_size=img_size,
        fc_norm=fc_norm,
    ).eval()
    in_chans = exported.patch_embed.proj.in_channels
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, in_chans, img_size, img_size, generator=generator)
    difference = exported.forward_features(images) - reference.forward_features(images)
    return difference.abs().max().item()


@torch.no_grad()
def main(args):
    _, _, info = backbones.read_backbone(args.checkpoint)
    name = args.model or info['model']
    if not name:
        raise InputError(
            f'{args.checkpoint} ({info["format"]}) does not say which timm model it is: give '
            f'--model, e.g. vit_small_patch16_224, vit_base_patch16_224, or mocov3_vit_small '
            f'for the official MoCo v3 ViT-S (12 heads)'
        )
    if name not in timm.list_models():
        raise InputError(f'--model {name} is not a timm model name: see timm.list_models()')
    # The architecture as the file describes it (heads from `arch`, size from the weights) ...
    reference = backbones.load_backbone(args.checkpoint)
    img_size = reference.patch_embed.img_size[0]
    # ... and the same weights in the named timm model, shape- and head-checked.
    named = timm.create_model(name, num_classes=0, img_size=img_size)
    backbone = backbones.load_backbone(args.checkpoint, named, flag='--model', verbose=False)
    state_dict = {k: v.clone().contiguous() for k, v in backbone.state_dict().items()}
    # A global-pool fine-tuned backbone: its norm comes after the pooling.
    fc_norm = 'fc_norm.weight' in state_dict
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # The file is checked before it takes its name: a failed file never stays.
    tmp = f'{args.output}.tmp.{os.getpid()}'
    torch.save(state_dict, tmp)
    try:
        if args.check:
            difference = feature_difference(name, tmp, img_size, fc_norm, reference)
            if difference > 1e-5:  # more than float32 round-off
                raise InputError(
                    f'{name} loaded from the export of {args.checkpoint} gives other features '
                    f'(max difference {difference:.2e}): the architectures differ; nothing written'
                )
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(
        f'wrote {args.output}: {len(state_dict)} tensors of {name} ({img_size} px), '
        'a plain timm state dict'
    )
    if args.check:
        fc_norm_arg = ''
        if fc_norm:
            fc_norm_arg = ', fc_norm=True'
        print(
            f'checked: timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay='
            f'dict(file={args.output!r}), num_classes=0{fc_norm_arg}) gives the same features '
            f'(max difference {difference:.1e})'
        )
    return name


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        'export a backbone as a timm state dict', parents=[get_args_parser()]
    )
    run_main(main, parser.parse_args())
