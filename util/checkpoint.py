"""Training state: save (whole or not at all), resume (exactly, and only the same run), RNG, seeds.

ViT backbones of any origin are read by util/backbones.py.
"""

import argparse
import errno
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
        # The training checkpoints of MAE, DINO and DeiT pickle their argparse.Namespace: plain
        # data, safe to read.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL (\S+)', str(e))
        if found:
            raise InputError(
                f'{path} is refused: loading it would call {found.group(1)}, which a '
                f'checkpoint of tensors and plain data never needs (it could run code). '
                f'Re-save it as a plain state dict from a source you trust'
            ) from None
        raise InputError(
            f'{path} is not a readable PyTorch checkpoint (corrupt, truncated, or '
            f'another kind of file): re-download or re-save it'
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise InputError(
            f'{path} is not a readable PyTorch checkpoint (corrupt or truncated?): '
            f'{str(e).splitlines()[0][:160]}'
        ) from None


def rng_state() -> dict:
    """torch, Python, NumPy (its key array as a tensor, for weights_only) and CUDA RNG states."""
    name, keys, *rest = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'python': random.getstate(),
        'numpy': [name, torch.from_numpy(keys.astype(np.int64)), *rest],
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """torch, NumPy (which takes 32 bits) and Python RNGs seeded from one number."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# Why a write fails, in words, by errno.
WRITE_FAILURES = {
    errno.ENOSPC: 'the disk is full',
    errno.EDQUOT: 'the disk quota is used up',
    errno.EACCES: 'the folder is not writable',
    errno.EPERM: 'the folder is not writable',
    errno.EROFS: 'the file system is read-only',
}


def save_checkpoint(state: dict, path: str) -> None:
    """Write whole or not at all: a temporary file in the same folder, then an atomic rename.

    A failed write (disk full, folder not writable) leaves no temporary file and `path` as it was
    (the last good checkpoint, which a rerun resumes from); raises InputError saying what failed.
    """
    if not is_main_process():
        return
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = WRITE_FAILURES.get(e.errno, e.strerror or str(e))
        kept = 'no checkpoint was there yet'
        if os.path.isfile(path):
            kept = f'the last good one, {path}, is kept and a rerun resumes from it'
        raise InputError(
            f'could not save checkpoint {path}: {reason} (errno {errno.errorcode.get(e.errno)}); '
            f'{kept}: free space or fix the folder (--output_dir), then rerun'
        ) from None


def _as_tuples(values) -> tuple:
    """`values` as a tuple, each list in it a tuple too: random.setstate takes tuples only, and
    random.getstate()'s inner tuple may come back from the file as a list."""
    converted = []
    for value in values:
        if isinstance(value, list):
            converted.append(tuple(value))
        else:
            converted.append(value)
    return tuple(converted)


def _set_rng_state(state: dict) -> None:
    """The inverse of rng_state: torch, Python, NumPy and (where saved and available) CUDA."""
    torch.set_rng_state(state['torch'])
    random.setstate(_as_tuples(state['python']))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def restore_rng(saved, seed: int, start_epoch: int) -> None:
    """Each rank continues its own RNG stream (`saved`: one state per rank of the run that saved it;
    a lone dict in older files). Under another number of processes there is no stream to continue:
    each rank gets a fresh one of its own, seeded from (--seed, rank, epoch)."""
    states = saved
    if not isinstance(saved, list):
        states = [saved]
    if len(states) == get_world_size():
        _set_rng_state(states[get_rank()])
        return
    seed_everything(seed + get_rank() + 1000 * start_epoch)
    print(
        f'the checkpoint holds the RNG streams of {len(states)} process(es), this run has '
        f'{get_world_size()}: fresh streams seeded per rank (the run goes on, but not bit for bit '
        f'as it would have)'
    )


def training_state(args, epoch: int, model, optimizer, scaler, **extra) -> dict:
    """Ours: {'model', 'optimizer', 'scaler', 'epoch', 'args', 'num_heads', 'rng'} and `extra`.

    args a plain dict (for weights_only=True); the head count of the (first) ViT in `model`, which
    no shape tells; 'rng' one state per rank (each draws its own drop path, masks and
    augmentations), so every rank must call this. An `extra` module (an EMA) is saved by its state
    dict, a value (acc1) as it is.
    """
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    num_heads = None
    if vit is not None:
        num_heads = vit.blocks[0].attn.num_heads
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'epoch': epoch,
        'args': dict(vars(args)),
        'num_heads': num_heads,
        'rng': all_gather_objects(rng_state()),
    }
    for name, value in extra.items():
        if hasattr(value, 'state_dict'):
            state[name] = value.state_dict()
        else:
            state[name] = value
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
        raise InputError(
            f'--output_dir {path} is not writable ({e.strerror}): pick another folder'
        ) from None


# What defines a run in every script (each adds its own: --method, --teacher, --finetune ...): an
# implicit resume of another run would carry it on in place of this one. Not --epochs: raising it
# extends a run.
SAME_RUN = (
    'data_path',
    'dataset',
    'model',
    'input_size',
    'subset_file',
    'train_fraction',
    'shots_per_class',
    'subset_draw_index',
    'blr',
    'lr',
    'warmup_epochs',
)


def same_setting(there, here) -> bool:
    """Whether a flag's saved value and its value now are one setting: equal, both unset, or two
    spellings of one file."""
    if there == here:
        return True
    if not there and not here:
        return True
    both_paths = isinstance(there, str) and isinstance(here, str) and there and here
    if both_paths:
        return os.path.realpath(there) == os.path.realpath(here)
    return False


def shown(value) -> str:
    """A flag's value as an error message shows it."""
    if value is None or value == '':
        return 'none'
    return str(value)


# Each script's own, checked before SAME_RUN. Here rather than in the scripts because
# submitit_launch.py checks them too, before a job waits in the queue.
SCRIPT_SAME_RUN = {
    'main_pretrain.py': ('method', 'teacher', 'graft_pretrained', 'optimizer'),
    'main_finetune.py': ('finetune',),
    'main_linprobe.py': ('global_pool', 'optimizer'),
}


def check_same_run(path: str, checkpoint: dict, args, flags: tuple = ()) -> None:
    """Refuse to auto-resume output_dir/checkpoint-last.pth of a run with other SAME_RUN or `flags`
    (its saved args against `args`), which would carry that run on in place of this one."""
    saved = checkpoint.get('args') or {}
    # The script's own flags first: --finetune says more than --model.
    for flag in tuple(flags) + SAME_RUN:
        if flag not in saved or not hasattr(args, flag):
            continue
        there = saved[flag]
        here = getattr(args, flag)
        if same_setting(there, here):
            continue
        hint = ''
        if flag == 'lr':
            hint = ' (the lr is --blr x batch size x processes x --accum_iter / 256)'
        raise InputError(
            f'{path} is the checkpoint of another run (--{flag} {shown(there)} there, '
            f'{shown(here)} here{hint}), which would be resumed in place of this one: use a fresh '
            f'--output_dir, delete that file, or --resume {path} to continue it'
        )


def strip_ddp_prefix(state_dict: dict) -> dict:
    """The state dict without the `module.` that DistributedDataParallel puts before every key
    (a model saved wrapped), as the backbone loaders read such files (util/backbones.py)."""
    if state_dict and all(key.startswith('module.') for key in state_dict):
        return {key.removeprefix('module.'): value for key, value in state_dict.items()}
    return state_dict


def fit_problems(state_dict: dict, expected: dict, resampled: tuple = ()) -> list:
    """Why `state_dict` does not load into a model of state dict `expected`: shape mismatches (the
    first 3; not of the `resampled` keys), missing and unexpected keys (the first 4 of each)."""
    wrong = [
        f'{k} {tuple(state_dict[k].shape)} in the file vs {tuple(expected[k].shape)} in the model'
        for k in expected
        if k in state_dict and k not in resampled and state_dict[k].shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = wrong[:3]
    if missing:
        problems.append(f'missing {", ".join(missing[:4])}')
    if unexpected:
        problems.append(f'unexpected {", ".join(unexpected[:4])}')
    return problems


def load_model_state(path: str, model, state_dict: dict) -> None:
    """model.load_state_dict of a resumed file (a DDP `module.` prefix stripped); InputError naming
    the keys and shapes that do not fit, and the fix."""
    state_dict = strip_ddp_prefix(state_dict)
    expected = model.state_dict()
    problems = fit_problems(state_dict, expected)
    if not problems:
        model.load_state_dict(state_dict)
        return
    head_differs = any(
        k.startswith('head.') and k in state_dict and state_dict[k].shape != v.shape
        for k, v in expected.items()
    )
    if head_differs:
        fix = (
            "the file's classifier has another class count than the data: resume it on the data "
            'it was trained on, or start a new fine-tune from it with --finetune'
        )
    else:
        fix = 'resume with the flags of the run that wrote it (its args are saved in the file)'
    raise InputError(f'{path} does not fit this model: {"; ".join(problems)}: {fix}')


def checkpoint_to_resume(args) -> str:
    """--resume, else output_dir/checkpoint-last.pth if it exists, else '' (a fresh start)."""
    if args.resume:
        return args.resume
    if not args.output_dir:
        return ''
    last = os.path.join(args.output_dir, 'checkpoint-last.pth')
    if os.path.isfile(last):
        return last
    return ''


def resume(
    args, model, optimizer=None, scaler=None, validate=None, same_run: tuple = (), **extra
) -> dict:
    """Restore model, optimizer, scaler, RNG and any `extra` modules from the checkpoint to resume.

    `validate(path, checkpoint)` may refuse the file before anything is restored; an implicit
    resume (no --resume) also refuses a run whose SAME_RUN or `same_run` flags differ. Returns the
    checkpoint read (the run goes on at its 'epoch' + 1), or None for a fresh start.
    """
    path = checkpoint_to_resume(args)
    if not path:
        return None
    checkpoint = load_file(path)
    if 'model' not in checkpoint or 'epoch' not in checkpoint:
        raise InputError(
            f'{path} is not a training checkpoint of this repository: use --resume '
            f'with a checkpoint-*.pth written by these scripts'
        )
    if validate is not None:
        validate(path, checkpoint)
    if not args.resume:
        check_same_run(path, checkpoint, args, same_run)
    load_model_state(path, model, checkpoint['model'])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler is not None and 'scaler' in checkpoint:
        scaler.load_state_dict(checkpoint['scaler'])
    for name, module in extra.items():
        module.load_state_dict(checkpoint[name])
    start_epoch = checkpoint['epoch'] + 1
    if 'rng' in checkpoint:
        restore_rng(checkpoint['rng'], args.seed, start_epoch)
    print(f'resumed from {path} (epoch {checkpoint["epoch"]}); continuing at epoch {start_epoch}')
    return checkpoint


def start_epoch(resumed: dict, first_epoch: int) -> int:
    """The first epoch to train: the one after a resumed checkpoint's, else --start_epoch."""
    if resumed is None:
        return first_epoch
    return resumed['epoch'] + 1
