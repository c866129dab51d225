"""MAE and the Layer Grafted cascade on digits, end to end: the real scripts, small settings."""

import math
import os

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler

import main_pretrain
import models_mae
import models_mocov3
import pretrain_setup as pretrain
from engine import LoopSettings
from engine_pretrain import train_one_epoch
from tests.conftest import FAST, epoch_losses
from util import backbones, data, graft, transforms
from util.errors import InputError
from util.masking import random_masking_indices

MAE = '--method mae --decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4'.split() + FAST
GRAFT = '--method mocov3 --moco_mlp_dim 256 --moco_dim 64 --warmup_epochs 0'.split() + FAST


# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def parse(argv):
    return main_pretrain.get_args_parser().parse_args(argv)


def last_checkpoint(output_dir):
    return torch.load(os.path.join(output_dir, 'checkpoint-last.pth'), weights_only=True)


def digits_batch(n=32):
    args = parse([])
    args.input_size = 16
    dataset = data.build_dataset(args, is_train=False, transform=transforms.eval_transform(args))
    return torch.stack([dataset[i][0] for i in range(n)])


@pytest.fixture(scope='session')
def mae_dir(tmp_path_factory):
    """Stage 1: MAE on digits for a few epochs (shared by the grafting tests)."""
    out = tmp_path_factory.mktemp('mae')
    main_pretrain.main(
        parse(MAE + ['--epochs', '3', '--warmup_epochs', '1', '--output_dir', str(out)])
    )
    return out


@pytest.fixture(scope='session')
def official_mae_path(mae_dir, tmp_path_factory):
    """Our MAE checkpoint re-saved in the official MAE layout: {'model': encoder keys at the top,
    mask_token and decoder_*}, no args."""
    state = last_checkpoint(mae_dir)['model']
    official = {k.removeprefix('encoder.'): v for k, v in state.items()}
    path = tmp_path_factory.mktemp('official') / 'mae_pretrain_vit.pth'
    torch.save({'model': official}, path)
    return path


# ------------------------------------------------------------ MAE


def test_random_masking_is_exact_and_unshuffles():
    B, N = 64, 196
    ids_keep, ids_restore, mask = random_masking_indices(B, N, 0.75)
    num_masked = round(0.75 * N)
    assert ids_keep.shape == (B, N - num_masked)
    assert (mask.sum(dim=1) == num_masked).all()
    # Kept and masked positions together are every patch, once.
    ids_masked = torch.argsort(ids_restore, dim=1)[:, N - num_masked :]
    together = torch.cat([ids_keep, ids_masked], dim=1).sort(dim=1).values
    assert torch.equal(together, torch.arange(N).expand(B, -1))
    assert (torch.gather(mask, 1, ids_keep) == 0).all() and (
        torch.gather(mask, 1, ids_masked) == 1
    ).all()
    # Gathering (kept, masked) with ids_restore gives back the image order.
    tokens = torch.arange(N).expand(B, -1)
    shuffled = torch.cat(
        [torch.gather(tokens, 1, ids_keep), torch.gather(tokens, 1, ids_masked)], 1
    )
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), tokens)


def test_mae_patchify_and_reconstruct_shapes():
    mae = models_mae.MAE(timm.create_model('vit_digits_patch4_16', num_classes=0), 32, 1, 4)
    images = digits_batch(8)
    assert torch.equal(mae.unpatchify(mae.patchify(images), (4, 4)), images)
    # patchify's patch i is the patch the embedding's token i sees.
    assert torch.equal(
        mae.patchify(images)[:, 5], images[:, :, 4:8, 4:8].permute(0, 2, 3, 1).flatten(1)
    )
    recon, mask = mae.reconstruct(images)
    assert recon.shape == images.shape and (mask.sum(1) == 12).all()


def test_mae_loss_falls_and_checkpoint_is_a_backbone(mae_dir):
    losses = epoch_losses(mae_dir)
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.3, losses  # measured 1.95 -> 1.13
    ckpt = last_checkpoint(mae_dir)
    assert ckpt['args']['mask_ratio'] == 0.75 and ckpt['args']['opt_betas'] == [0.9, 0.95]
    mae = models_mae.MAE(timm.create_model('vit_digits_patch4_16', num_classes=0), 64, 2, 4)
    mae.load_state_dict(ckpt['model'])
    backbone = backbones.load_backbone(str(mae_dir / 'checkpoint-last.pth'))
    images = digits_batch()
    with torch.no_grad():
        assert torch.allclose(
            backbone.forward_features(images), mae.encoder.forward_features(images)
        )


def test_official_mae_format_loads_with_the_same_features(mae_dir, official_mae_path):
    state, _, info = backbones.read_backbone(str(official_mae_path))
    assert (
        info['format'] == 'MAE'
        and 'decoder_pred.weight' in info['skipped']
        and 'mask_token' in info['skipped']
    )
    official = backbones.load_backbone(
        str(official_mae_path), timm.create_model('vit_digits_patch4_16', num_classes=0)
    )
    mae = models_mae.MAE(timm.create_model('vit_digits_patch4_16', num_classes=0), 64, 2, 4)
    mae.load_state_dict(last_checkpoint(mae_dir)['model'])
    mae.eval()
    images = digits_batch()
    with torch.no_grad():
        assert torch.equal(official.forward_features(images), mae.encoder.forward_features(images))


def test_mae_bad_flags_are_named():
    with pytest.raises(InputError, match='--mask_type'):
        main_pretrain.main(parse(MAE + ['--mask_type', 'block']))
    with pytest.raises(InputError, match='--decoder_num_heads'):
        main_pretrain.main(parse(MAE + ['--decoder_num_heads', '5']))


# ------------------------------------------------------------ grafting


@pytest.mark.parametrize('depth', [6, 12])
def test_graft_param_groups_map_blocks_to_groups(depth):
    encoder = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=0
    )
    models_mocov3.mocov3_init(encoder, stop_grad_conv1=True)
    model = models_mocov3.MoCoV3(encoder, dim=16, mlp_dim=32)
    multipliers = [0.1, 0.5, 1.0]
    groups = graft.graft_param_groups(model, multipliers, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in groups:
        for p in group['params']:
            name = names[id(p)]
            seen[name] = group['lr_scale']
            assert group['weight_decay'] == (0.0 if p.ndim <= 1 else 0.1), name
    third = depth // 3
    for i in range(depth):
        block = [s for n, s in seen.items() if n.startswith(f'base_encoder.blocks.{i}.')]
        assert len(block) == 12 and set(block) == {multipliers[i // third]}, (i, block)
    assert seen['base_encoder.cls_token'] == 0.1
    assert seen['base_encoder.norm.weight'] == seen['base_encoder.head.0.weight'] == 1.0
    assert seen['predictor.0.weight'] == 1.0
    # Frozen (patch projection, positions) and momentum parameters are never optimised.
    assert not any(
        n.startswith('momentum_encoder') or 'patch_embed' in n or 'pos_embed' in n for n in seen
    )
    assert len(seen) == sum(p.requires_grad for p in model.parameters())
    # timm's scheduler gives each group blr-derived lr times its multiplier.
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=100,
        warmup_t=10,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scheduler.step_update(5)
    for group in optimizer.param_groups:
        assert math.isclose(group['lr'], 0.5e-3 * group['lr_scale'])


def test_graft_bad_multipliers_and_depth_are_named(official_mae_path):
    for bad in ('0.1,1', '0.1,0.1,1,1', 'a,b,c', '-1,1,1'):
        with pytest.raises(InputError, match='three non-negative lr multipliers'):
            main_pretrain.main(
                parse(
                    GRAFT + ['--graft_pretrained', str(official_mae_path), f'--lr_layer_wise={bad}']
                )
            )
    encoder = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0
    )
    with pytest.raises(InputError, match='divisible by 3'):
        graft.graft_param_groups(models_mocov3.MoCoV3(encoder, 16, 32), [1, 1, 1], 0.1)
    with pytest.raises(InputError, match='--method mocov3'):
        main_pretrain.main(parse(MAE + ['--method', 'mtl', '--lr_layer_wise', '1,1,1']))


def test_graft_build_freezes_and_pulls(official_mae_path):
    args = parse(
        GRAFT
        + [
            '--graft_pretrained',
            str(official_mae_path),
            '--graft_freeze_blocks',
            '2',
            '--graft_l1_weight',
            '1e-3',
            '--graft_l1_blocks',
            '4',
        ]
    )
    pretrain.resolve_args(args)
    assert args.lr_layer_wise == '0.1,0.1,1'  # the paper's setting is the grafting default
    model, _ = pretrain.build_model(args)
    mae = torch.load(official_mae_path, weights_only=True)['model']
    for name, value in model.momentum_encoder.state_dict().items():  # both encoders start from MAE
        if not name.startswith('head.'):  # the projector is new
            assert torch.equal(value, mae[name]), name
    trainable = {n for n, p in model.base_encoder.named_parameters() if p.requires_grad}
    # The official --fixTo N freezes the CLS token with the first N blocks.
    assert not any(
        n.startswith(('blocks.0.', 'blocks.1.', 'patch_embed', 'pos_embed', 'cls_token'))
        for n in trainable
    )
    assert 'blocks.2.attn.qkv.weight' in trainable
    # The pull covers the trainable blocks 2, 3 (the embeddings are frozen); zero at the start.
    assert len(model.l1_pull.params) == 2 * 12
    assert model.l1_pull().item() == 0.0
    with torch.no_grad():
        model.base_encoder.blocks[3].attn.proj.bias.add_(0.5)
    assert math.isclose(model.l1_pull().item(), 1e-3 * 0.5 * 128, rel_tol=1e-5)


def test_graft_zero_lr_keeps_lower_blocks_bit_identical(official_mae_path, tmp_path):
    """--lr_layer_wise 0,0,1 from the official-format file: blocks 0-3 (and the CLS token) stay the
    MAE's to the bit, blocks 4-5 move."""
    main_pretrain.main(
        parse(
            GRAFT
            + [
                '--graft_pretrained',
                str(official_mae_path),
                '--lr_layer_wise',
                '0,0,1',
                '--epochs',
                '1',
                '--output_dir',
                str(tmp_path),
            ]
        )
    )
    mae = torch.load(official_mae_path, weights_only=True)['model']
    ckpt = last_checkpoint(tmp_path)
    trained = ckpt['model']
    for name in [k for k in mae if k.startswith('blocks.')]:
        moved = not torch.equal(trained[f'base_encoder.{name}'], mae[name])
        assert moved == (int(name.split('.')[1]) >= 4), name
    for name in ('cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'):
        assert torch.equal(trained[f'base_encoder.{name}'], mae[name]), name
    lrs = {g['graft_group']: (g['lr'], g['lr_scale']) for g in ckpt['optimizer']['param_groups']}
    assert lrs[0] == lrs[1] == (0.0, 0.0) and lrs[2][0] > 0


@pytest.mark.slow
def test_grafted_loss_falls_and_every_block_moves(mae_dir, tmp_path):
    """The official code never stepped its GradScaler (its issue #1): here the stage-2 loss falls
    and every block moves, the lower two thirds at 0.1x the lr."""
    main_pretrain.main(
        parse(
            GRAFT
            + [
                '--graft_pretrained',
                str(mae_dir / 'checkpoint-last.pth'),
                '--lr_layer_wise',
                '0.1,0.1,1',
                '--blr',
                '1e-3',
                '--epochs',
                '2',
                '--output_dir',
                str(tmp_path),
            ]
        )
    )
    losses = epoch_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.05, losses
    mae = last_checkpoint(mae_dir)['model']
    ckpt = last_checkpoint(tmp_path)
    for i in range(6):
        before = torch.cat(
            [v.flatten() for k, v in mae.items() if k.startswith(f'encoder.blocks.{i}.')]
        )
        after = torch.cat(
            [
                v.flatten()
                for k, v in ckpt['model'].items()
                if k.startswith(f'base_encoder.blocks.{i}.')
            ]
        )
        assert not torch.equal(before, after), i
    assert ckpt['scaler'] == {}  # fp32 on CPU: the scaler is off


@pytest.mark.parametrize(
    'amp',
    [
        'none',
        pytest.param('bf16', marks=pytest.mark.slow),
        pytest.param('fp16', marks=pytest.mark.slow),
    ],
)  # 20-25 s each on 2 cores
def test_grafted_training_steps_under_each_precision(mae_dir, amp):
    """fp32, bf16 autocast and fp16 autocast with an enabled GradScaler all lower the grafted loss
    through engine.train_one_epoch. CPU autocast in half precision is ~10x slower than fp32 here,
    so this runs on 64 digits, batch 32, for 4 epochs (8 steps)."""
    torch.manual_seed(0)
    args = parse(
        GRAFT
        + ['--graft_pretrained', str(mae_dir / 'checkpoint-last.pth'), '--amp', amp]
        + ['--batch_size', '32', '--output_dir', '']
    )
    pretrain.resolve_args(args)
    args.distributed, args.lr = False, 1e-3
    model, _ = pretrain.build_model(args)
    dataset = data.build_dataset(args, True, transforms.pretrain_transform(args))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(64)), batch_size=32)
    optimizer = pretrain.build_optimizer(args, model)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, t_in_epochs=False)
    scaler = torch.amp.GradScaler('cpu', enabled=amp == 'fp16')  # as main() makes it
    before = [p.detach().clone() for p in model.base_encoder.blocks.parameters()]
    loop = LoopSettings(torch.device('cpu'), optimizer, scheduler, scaler, amp=args.amp)
    losses = [
        train_one_epoch(model, loader, loop, epoch, momentum_schedule=lambda _: 0.99)['loss']
        for epoch in range(4)
    ]
    assert losses[-1] < losses[0] - 0.02, losses
    assert all(
        not torch.equal(b, p) for b, p in zip(before, model.base_encoder.blocks.parameters())
    )
    if amp == 'fp16':  # the scaler is on and made steps (the tracker counts unskipped ones)
        assert scaler.is_enabled() and scaler.state_dict()['_growth_tracker'] > 0
