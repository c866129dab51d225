"""SLURM: util/dist.py under `srun` (SLURM's variables set by hand)."""

import argparse
import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch

from tests.conftest import ROOT, epoch_losses
from util import checkpoint
from util.dist import (
    expand_nodelist,
    first_host,
    init_distributed_mode,
    job_port,
    slurm_to_torchrun,
)

# MAE with a one-block decoder, 2 processes x 64 images, 3 epochs: ~10 s of training on 2 cores.
TINY_MAE = [
    '--method', 'mae', '--decoder_embed_dim', '32', '--decoder_depth', '1',
    '--decoder_num_heads', '2', '--epochs', '3', '--warmup_epochs', '1', '--blr', '1e-3',
    '--num_workers', '0', '--batch_size', '64', '--save_freq', '0', '--knn_freq', '0',
]  # fmt: skip
# One thread per process, as torchrun sets it: the same sums in the same order on both sides.
ENV = dict(os.environ, OMP_NUM_THREADS='1')
TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def final_weights(output_dir) -> dict:
    return checkpoint.load_file(os.path.join(output_dir, 'checkpoint-last.pth'))['model']


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, differ


@pytest.fixture(scope='module')
def torchrun_run(tmp_path_factory):
    """The reference: `torchrun --nproc_per_node 2 main_pretrain.py TINY_MAE` on CPU (gloo)."""
    out = str(tmp_path_factory.mktemp('torchrun'))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    torchrun += ['--nproc_per_node', '2']
    cmd = torchrun + ['main_pretrain.py'] + TINY_MAE + ['--output_dir', out]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(epoch_losses(out)) == 3
    return out


# --------------------------------------------------------------------------- util/dist.py under srun


def test_nodelist_expansion():
    assert expand_nodelist('node[01-03,07],gpu5') == [
        'node01',
        'node02',
        'node03',
        'node07',
        'gpu5',
    ]
    assert expand_nodelist('a[8-11]-ib,b[1,3]') == [
        'a8-ib',
        'a9-ib',
        'a10-ib',
        'a11-ib',
        'b1',
        'b3',
    ]
    assert expand_nodelist('learnfair0042') == ['learnfair0042']
    assert expand_nodelist('n[099-101]') == ['n099', 'n100', 'n101']


def test_first_host_asks_scontrol_where_it_is_installed(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))  # no scontrol: the pure-Python expansion
    assert first_host('node[07-09]') == 'node07'
    scontrol = tmp_path / 'scontrol'  # what `scontrol show hostnames LIST` prints, one per line
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "rack1-n3\\nrack1-n4\\n"\n'
    )
    scontrol.chmod(0o755)
    assert first_host('rack[1]-n[3-4]') == 'rack1-n3'


def test_slurm_variables_become_torchrun_ones():
    """Task 5 of 16 (2 nodes x 8) of job 4242: rank, world size, local rank, the first host, and a
    port that every task computes alike."""
    environ = {
        'SLURM_PROCID': '5',
        'SLURM_NTASKS': '16',
        'SLURM_LOCALID': '5',
        'SLURM_JOB_NODELIST': 'learnfair[0100-0101]',
        'SLURM_JOB_ID': '4242',
    }
    expected = {
        'RANK': '5',
        'WORLD_SIZE': '16',
        'LOCAL_RANK': '5',
        'MASTER_ADDR': 'learnfair0100',
        'MASTER_PORT': str(job_port('4242')),
    }
    assert slurm_to_torchrun(environ) == expected
    # The job step's nodes first (`srun -N 1` in a 2-node allocation); MASTER_ADDR/PORT if given.
    step = {**environ, 'SLURM_STEP_NODELIST': 'learnfair0101', 'MASTER_PORT': '12345'}
    assert slurm_to_torchrun(step)['MASTER_ADDR'] == 'learnfair0101'
    assert slurm_to_torchrun(step)['MASTER_PORT'] == '12345'
    assert 20000 <= job_port('4242_7') < 40000 and job_port('4242') != job_port('4243')


def test_init_distributed_mode_reads_slurm():
    """One srun task: a process group of SLURM's world size and rank; torchrun's variables win."""
    slurm = {
        'SLURM_PROCID': '0',
        'SLURM_NTASKS': '1',
        'SLURM_LOCALID': '0',
        'SLURM_JOB_NODELIST': 'localhost',
        'SLURM_JOB_ID': '77',
        'MASTER_PORT': str(free_port()),
    }
    args = argparse.Namespace(device='cpu', dist_url='env://')
    with mock.patch.dict(os.environ, slurm):  # restores the environment it changes
        for name in TORCHRUN_VARIABLES[:-1]:
            os.environ.pop(name, None)
        init_distributed_mode(args)
        try:
            assert args.distributed and args.rank == 0 and args.world_size == 1
            assert torch.distributed.get_world_size() == 1
            assert os.environ['MASTER_ADDR'] == 'localhost' and os.environ['RANK'] == '0'
        finally:
            torch.distributed.destroy_process_group()
    # torchrun inside a SLURM job: torchrun's ranks (SLURM_PROCID 3 of 1 task would fail).
    torchrun = {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1'}
    torchrun['MASTER_PORT'] = str(free_port())
    with mock.patch.dict(os.environ, {**slurm, 'SLURM_PROCID': '3', **torchrun}):
        init_distributed_mode(args)
        torch.distributed.destroy_process_group()
        assert args.rank == 0 and os.environ['RANK'] == '0'


@pytest.mark.slow  # ~30 s on 2 cores, plus the torchrun reference
def test_srun_tasks_train_the_torchrun_run(torchrun_run, tmp_path):
    """Two processes started as srun starts them (SLURM_PROCID 0 and 1 of SLURM_NTASKS 2, no
    torchrun variables) train one run: torchrun's losses and weights, to the bit."""
    out = str(tmp_path / 'srun')
    cmd = [sys.executable, 'main_pretrain.py'] + TINY_MAE + ['--output_dir', out]
    env = {name: value for name, value in ENV.items() if name not in TORCHRUN_VARIABLES}
    slurm = {'SLURM_NTASKS': '2', 'SLURM_JOB_NODELIST': 'localhost', 'SLURM_JOB_ID': '4242'}
    slurm['MASTER_PORT'] = str(free_port())
    tasks = []
    for rank in range(2):
        task_env = {**env, **slurm, 'SLURM_PROCID': str(rank), 'SLURM_LOCALID': str(rank)}
        tasks.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=task_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert 'rank 1 of 2' in outputs[1]
    assert epoch_losses(out) == epoch_losses(torchrun_run)
    assert_same_weights(final_weights(out), final_weights(torchrun_run))
