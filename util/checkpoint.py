"""Training state: save (whole or not at all), resume (exactly, and only the same run), RNG, seeds.

ViT backbones of any origin are read by util/backbones.py.
"""
import argparse
import os
import pickle
import random
import re

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from util.dist import all_gather_objects, get_rank, get_world_size, is_main_process
from util.errors import InputError


def load_file(path: str) -> dict:
    """torch.load with weights_only=True: a file whose pickle would run code is refused unrun."""
    if not os.path.isfile(path):
        raise InputError(f'checkpoint {path} does not exist: check the path')
    try:
        # The training checkpoints of MAE, DINO and DeiT pickle their argparse.Namespace: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL (\S+)', str(e))
        if found:
            raise InputError(f'{path} is refused: loading it would call {found.group(1)}, which a '
                             f'checkpoint of tensors and plain data never needs (it could run code). '
                             f'Re-save it as a plain state dict from a source you trust') from None
        raise InputError(f'{path} is not a readable PyTorch checkpoint (corrupt, truncated, or '
                         f'another kind of file): re-download or re-save it') from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise InputError(f'{path} is not a readable PyTorch checkpoint (corrupt or truncated?): '
                         f'{str(e).splitlines()[0][:160]}') from None


def rng_state() -> dict:
    """torch, Python, NumPy (its key array as a tensor, for weights_only) and CUDA RNG states."""
    name, keys, *rest = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [name, torch.from_numpy(keys.astype(np.int64)), *rest]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def save_checkpoint(state: dict, path: str) -> None:
    """Write whole or not at all: a temporary file in the same folder, then an atomic rename."""
    if is_main_process():
        tmp = f'{path}.tmp.{os.getpid()}'
        torch.save(state, tmp)
        os.replace(tmp, path)


def restore_rng(saved, args) -> None:
    """Each rank continues its own RNG stream (`saved`: one state per rank of the run that saved it;
    a lone dict in older files). Under another number of processes there is no stream to continue:
    each rank gets a fresh one of its own, seeded from (--seed, rank, epoch)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == get_world_size():
        state = states[get_rank()]
        torch.set_rng_state(state['torch'])
        random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state['python']))
        name, keys, *rest = state['numpy']
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
        return
    seed_everything(args.seed + get_rank() + 1000 * args.start_epoch)
    print(f'the checkpoint holds the RNG streams of {len(states)} process(es), this run has {get_world_size()}: '
          f'fresh streams seeded per rank (the run goes on, but not bit for bit as it would have)')


def training_state(args, epoch: int, model, optimizer, scaler, **extra) -> dict:
    """Ours: {'model', 'optimizer', 'scaler', 'epoch', 'args', 'num_heads', 'rng'}; args a plain dict (for
    weights_only=True); the head count of the (first) ViT in `model`, which no shape tells; 'rng' one state
    per rank (each draws its own drop path, masks and augmentations), so every rank must call this."""
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'scaler': scaler.state_dict(), 'epoch': epoch, 'args': dict(vars(args)),
             'num_heads': vit.blocks[0].attn.num_heads if vit is not None else None,
             'rng': all_gather_objects(rng_state())}
    state.update({k: v.state_dict() if hasattr(v, 'state_dict') else v for k, v in extra.items()})
    return state


def prepare_output_dir(path: str) -> None:
    """Create --output_dir and make sure a checkpoint can be written there, before any training."""
    if not path or not is_main_process():
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test.{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f'--output_dir {path} is not writable ({e.strerror}): pick another folder') from None


# What defines a run in every script (each adds its own: --method, --teacher, --finetune ...): an implicit
# resume of another run would carry it on in place of this one. Not --epochs: raising it extends a run.
SAME_RUN = ('data_path', 'dataset', 'model', 'input_size', 'subset_file', 'train_fraction',
            'shots_per_class', 'blr', 'lr', 'warmup_epochs')
# Each script's own, checked before SAME_RUN. Here rather than in the scripts because
# submitit_launch.py checks them too, before a job waits in the queue.
SCRIPT_SAME_RUN = {
    'main_pretrain.py': ('method', 'teacher', 'graft_pretrained', 'optimizer'),
    'main_finetune.py': ('finetune',),
    'main_linprobe.py': ('global_pool', 'optimizer'),
}


def check_same_run(path: str, checkpoint: dict, args, flags: tuple = ()) -> None:
    """Refuse to auto-resume output_dir/checkpoint-last.pth of a run with other SAME_RUN or `flags`."""
    saved = checkpoint.get('args') or {}
    for flag in tuple(flags) + SAME_RUN:  # the script's own first: --finetune says more than --model
        if flag not in saved or not hasattr(args, flag):
            continue
        there, here = saved[flag], getattr(args, flag)
        files = there and here and isinstance(there, str) and isinstance(here, str)
        if there == here or not (there or here) or files and os.path.realpath(there) == os.path.realpath(here):
            continue  # equal, both unset, or two spellings of one file
        there, here = ('none' if v is None or v == '' else v for v in (there, here))
        hint = ' (the lr is --blr x batch size x processes x --accum_iter / 256)' if flag == 'lr' else ''
        raise InputError(f'{path} is the checkpoint of another run (--{flag} {there} there, {here} here{hint}), '
                         f'which would be resumed in place of this one: use a fresh --output_dir, delete '
                         f'that file, or --resume {path} to continue it')


def resume(args, model, optimizer=None, scaler=None, validate=None, same_run: tuple = (), **extra) -> dict:
    """Restore model, optimizer, scaler, RNG and any `extra` modules; set args.start_epoch. `validate(path,
    checkpoint)` may refuse the file before anything is restored; an implicit resume (no --resume) also
    refuses a run whose SAME_RUN or `same_run` flags differ. Returns the checkpoint read, or None."""
    last = os.path.join(args.output_dir, 'checkpoint-last.pth') if args.output_dir else ''
    path = args.resume or (last if last and os.path.isfile(last) else '')
    if not path:
        return None
    checkpoint = load_file(path)
    if 'model' not in checkpoint or 'epoch' not in checkpoint:
        raise InputError(f'{path} is not a training checkpoint of this repository: use --resume '
                         f'with a checkpoint-*.pth written by these scripts')
    if validate is not None:
        validate(path, checkpoint)
    if not args.resume:
        check_same_run(path, checkpoint, args, same_run)
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:
        raise InputError(f'{path} does not fit this model ({str(e).splitlines()[0]}): resume with '
                         f'the flags of the run that wrote it (its args are saved in the file)') from None
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler is not None and 'scaler' in checkpoint:
        scaler.load_state_dict(checkpoint['scaler'])
    for name, module in extra.items():
        module.load_state_dict(checkpoint[name])
    args.start_epoch = checkpoint['epoch'] + 1
    if 'rng' in checkpoint:
        restore_rng(checkpoint['rng'], args)
    print(f'resumed from {path} (epoch {checkpoint["epoch"]}); continuing at epoch {args.start_epoch}')
    return checkpoint
