"""SLURM: util/dist.py under `srun` (SLURM's variables set by hand), and submitit_launch.py through
submitit's local executor (no SLURM here): a 2-task job trains the run that torchrun trains, and a
job preempted part-way is requeued and ends with the weights of one that never stopped."""

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

import submitit_launch
from tests.conftest import ROOT, epoch_losses
from tests.test_tools import FULL_SCALE, script_commands
from util import checkpoint
from util.dist import (
    expand_nodelist,
    first_host,
    init_distributed_mode,
    job_port,
    slurm_to_torchrun,
)
from util.errors import InputError

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


def launcher_args(argv: list):
    parser = argparse.ArgumentParser(parents=[submitit_launch.get_args_parser()])
    return parser.parse_args(argv)


def launch_command(job_dir) -> list:
    """The launcher on this machine (submitit's local executor), 2 tasks, waiting for the job."""
    launcher = [sys.executable, os.path.join(ROOT, 'submitit_launch.py')]
    flags = ['--cluster', 'local', '--ngpus', '2', '--wait', '--job_dir', f'{job_dir}/%j']
    return launcher + flags + ['main_pretrain.py'] + TINY_MAE


def job_folder(job_dir) -> str:
    """The one job folder under `job_dir` (named by the job id), which is also its --output_dir."""
    folders = [f for f in glob.glob(os.path.join(job_dir, '*')) if os.path.basename(f).isdigit()]
    assert len(folders) == 1, os.listdir(job_dir)
    return folders[0]


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


# ------------------------------------------------------------ util/dist.py under srun


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


# --------------------------------------------------------------------------- submitit_launch.py


@pytest.mark.slow  # ~35 s on 2 cores, plus the torchrun reference
def test_submitit_job_equals_torchrun(torchrun_run, tmp_path):
    """2 tasks of the local executor, ranks from submitit's JobEnvironment: torchrun's run, to the
    bit; its output in the job folder."""
    result = subprocess.run(
        launch_command(tmp_path), capture_output=True, text=True, timeout=600, env=ENV
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = job_folder(tmp_path)
    with open(os.path.join(out, 'log.txt')) as f:
        header = json.loads(f.readline())
    assert header['world_size'] == 2 and header['total_batch'] == 128
    assert epoch_losses(out) == epoch_losses(torchrun_run)
    assert_same_weights(final_weights(out), final_weights(torchrun_run))


def task_pids(controller: int) -> list:
    """The task processes of a local submitit job: the children of its controller."""
    with open(f'/proc/{controller}/task/{controller}/children') as f:
        return [int(pid) for pid in f.read().split()]


def task_log(job_folder: str) -> str:
    """Task 0's stdout in a local submitit job, every run of it (submitit's INFO lines go there)."""
    with open(glob.glob(os.path.join(job_folder, '*_0_log.out'))[0]) as f:
        return f.read()


def logged_epochs(output_dir) -> int:
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return 0
    return len(epoch_losses(output_dir))


@pytest.mark.slow  # ~45 s on 2 cores, plus the torchrun reference
def test_preempted_job_is_requeued_and_resumes(torchrun_run, tmp_path):
    """SLURM's preemption signal (USR2, to every task) once epoch 0 is logged: task 0 calls the
    launcher's checkpoint hook and submitit requeues the job; the same command resumes from
    checkpoint-last.pth (passing the same-run check) and ends with the uninterrupted weights."""
    launcher = subprocess.Popen(
        launch_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not glob.glob(str(tmp_path / '[0-9]*' / 'log.txt')):
            time.sleep(0.2)
        out = job_folder(tmp_path)
        while time.time() < deadline and logged_epochs(out) < 1:
            time.sleep(0.05)
        assert logged_epochs(out) == 1, 'epoch 0 was not logged within 5 minutes'
        for pid in task_pids(int(os.path.basename(out))):  # the job id is the controller's pid
            os.kill(pid, signal.SIGUSR2)
        stdout, stderr = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stdout[-2000:] + stderr[-3000:]
    log = task_log(out)
    assert 'this job is preempted' in log and 'Calling checkpoint method' in log
    assert 'Requeued job' in log and 'continuing at epoch' in log
    reference = epoch_losses(torchrun_run)
    with open(os.path.join(out, 'log.txt')) as f:
        entries = [json.loads(line) for line in f]
    for entry in entries:
        if 'train_loss' in entry:  # each epoch the job logged, before and after the requeue
            assert entry['train_loss'] == reference[entry['epoch']], entry
    assert_same_weights(final_weights(out), final_weights(torchrun_run))


def test_checkpoint_hook_requeues_the_same_command():
    """What submitit pickles for the requeue: the same script and flags, untouched by a run."""
    job = submitit_launch.Job('main_pretrain.py', TINY_MAE + ['--output_dir', 'o'])
    delayed = job.checkpoint()
    assert delayed.function.script == 'main_pretrain.py'
    assert delayed.function.argv == TINY_MAE + ['--output_dir', 'o']
    assert delayed.function is not job and delayed.args == () and delayed.kwargs == {}


def test_launcher_command_line_is_torchruns():
    """Launcher flags, then the script, then the script's own flags (which may share a name)."""
    args = launcher_args(['--nodes', '2', 'main_pretrain.py', '--method', 'mae', '--nodes', 'x'])
    assert args.nodes == 2 and args.script == 'main_pretrain.py'
    assert args.script_args == ['--method', 'mae', '--nodes', 'x']


def test_launcher_bad_input(tmp_path, monkeypatch):
    """An unknown script, a job folder holding another run's checkpoint, no submitit: one line
    each (InputError: `error: ...`, exit status 2 from the command line)."""
    with pytest.raises(InputError, match='unknown script main_pretrain: submitit_launch.py runs'):
        submitit_launch.main(launcher_args(['main_pretrain']))
    saved_args = vars(submitit_launch.parse_script_args('main_pretrain.py', TINY_MAE))
    saved_args.update(method='mocov3', lr=5e-4, output_dir=str(tmp_path))
    torch.save({'model': {}, 'epoch': 0, 'args': saved_args}, tmp_path / 'checkpoint-last.pth')
    argv = ['--cluster', 'local', 'main_pretrain.py'] + TINY_MAE + ['--output_dir', str(tmp_path)]
    with pytest.raises(
        InputError, match=r'checkpoint of another run \(--method mocov3 there, mae here\)'
    ):
        submitit_launch.main(launcher_args(argv))
    assert not glob.glob(str(tmp_path / '*_submitted.pkl'))  # refused before submitting
    # The same run (its --lr resolved in the file, unset here) is let through to the executor.
    same = submitit_launch.parse_script_args('main_pretrain.py', TINY_MAE)
    saved_args['method'] = 'mae'
    torch.save({'model': {}, 'epoch': 0, 'args': saved_args}, tmp_path / 'checkpoint-last.pth')
    submitit_launch.check_output_dir('main_pretrain.py', str(tmp_path), same)
    monkeypatch.setitem(sys.modules, 'submitit', None)  # `import submitit` fails
    with pytest.raises(
        InputError, match=r'submitit is not installed.*: pip install submitit==1\.5\.4'
    ):
        submitit_launch.main(launcher_args(['main_pretrain.py']))


def test_launcher_errors_are_one_line_and_exit_2():
    """Without submitit installed (hidden from the import system), and an unknown script."""
    hide = 'import runpy, sys; sys.modules["submitit"] = None; sys.argv = sys.argv[1:]; '
    hide += 'runpy.run_path(sys.argv[0], run_name="__main__")'
    launcher = os.path.join(ROOT, 'submitit_launch.py')
    for argv, expected in [
        (['-c', hide, launcher, 'main_pretrain.py'], 'error: submitit is not installed'),
        ([launcher, 'train.py'], 'error: unknown script train.py'),
    ]:
        result = subprocess.run(
            [sys.executable] + argv, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(expected), result.stderr


def test_full_scale_scripts_run_under_the_launcher():
    """scripts/*.sh with LAUNCH="python submitit_launch.py --wait ...": every stage's command splits
    into the launcher's flags and the script's, and the script's parse."""
    for path in FULL_SCALE:
        for script, argv, _ in script_commands(path):
            args = launcher_args(['--wait', '--ngpus', '8', '--partition', 'p', script] + argv)
            assert args.wait and args.partition == 'p' and args.script == script
            assert args.script_args == argv
            script_args = submitit_launch.parse_script_args(script, args.script_args)
            assert script_args.data_path == '/imagenet' and script_args.output_dir
