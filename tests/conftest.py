"""Shared pieces of the tests: small pre-training settings and a MoCo v3 teacher trained once."""

import argparse
import builtins
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
from engine import LoopSettings  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402

FAST = ['--num_workers', '0', '--print_freq', '5', '--batch_size', '128']
MOCO = ['--method', 'mocov3', '--moco_mlp_dim', '256', '--moco_dim', '64'] + FAST
MIMCO = ['--method', 'mimco', '--head_dim', '256', '--mask_ratio', '0.5'] + FAST
# MAE with a one-block decoder.
TINY_MAE = '--method mae --decoder_embed_dim 32 --decoder_depth 1 --decoder_num_heads 2'.split()
# Two processes on one machine: `TORCHRUN + [script] + argv`.
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a test module: on a shared 2-core machine two threads spin against
    each other and the other processes (measured: a step 10x slower). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(argv):
    return main_pretrain.get_args_parser().parse_args(argv)


def knn_of(path, out) -> dict:
    """main_linprobe.py --protocol knn on the checkpoint at `path`: its metrics."""
    parser = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()])
    argv = '--protocol knn --num_workers 0'.split() + [
        '--checkpoint',
        path,
        '--output_dir',
        str(out),
    ]
    return main_linprobe.main(parser.parse_args(argv))


def save_official_mocov3(vit, path):
    """`vit`'s weights in the official MoCo v3 release's layout (vit-s-300ep.pth.tar)."""
    state_dict = {f'module.base_encoder.{k}': v for k, v in vit.state_dict().items()}
    torch.save({'state_dict': state_dict, 'arch': 'vit_small', 'epoch': 300}, path)


def train_epoch_on_cpu(model, loader, optimizer, scheduler, epoch, teacher=None, **settings):
    """engine_pretrain.train_one_epoch in fp32 on the CPU; `settings` are LoopSettings' fields."""
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    loop = LoopSettings(torch.device('cpu'), optimizer, scheduler, scaler, **settings)
    train_one_epoch(model, loader, loop, epoch, teacher=teacher)


def epoch_losses(output_dir):
    """The per-epoch training losses in log.txt (not its run header or summary lines)."""
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [entry['train_loss'] for entry in map(json.loads, f) if 'train_loss' in entry]


def run_script(argv, **kwargs):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'main_pretrain.py')] + argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


@pytest.fixture(scope='session')
def teacher_path(tmp_path_factory):
    """A MoCo v3 teacher trained on digits for a few epochs (shared by the MimCo tests)."""
    out = tmp_path_factory.mktemp('mocov3')
    main_pretrain.main(
        parse(
            MOCO
            + ['--epochs', '6', '--warmup_epochs', '1', '--blr', '1e-3', '--output_dir', str(out)]
        )
    )
    return str(out)


PLAIN_PRINT = builtins.print


@pytest.fixture(autouse=True)
def plain_print():
    """Each script's main() wraps print() with a timestamp (util.dist.setup_for_distributed), in
    session fixtures too: every test starts and ends with the plain one, so that no test's output
    depends on which tests ran before it."""
    builtins.print = PLAIN_PRINT
    yield
    builtins.print = PLAIN_PRINT


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: over ~30 s alone; runs in CI (CI=true) or with --runslow'
    )


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', help='also run the tests marked slow')


def pytest_collection_modifyitems(config, items):
    """A developer's `pytest tests` stays under 10 minutes; CI (CI=true) runs the slow tests too."""
    if config.getoption('--runslow') or os.environ.get('CI', '').lower() == 'true':
        return
    skip = pytest.mark.skip(reason='slow: set CI=true or pass --runslow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)
