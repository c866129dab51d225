"""Issue 18: the kNN monitor of pre-training, and the run header of every script."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import timm
import torch
import torchvision

import main_finetune
import main_pretrain
import pretrain_setup as pretrain
from tests.conftest import FAST, ROOT, knn_of, parse

MAE = '--method mae --decoder_embed_dim 64 --decoder_depth 1 --decoder_num_heads 4'.split() + FAST


def log_lines(out) -> list:
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_knn_monitor_is_main_linprobe_knn_and_draws_no_randomness(tmp_path, capsys):
    """--knn_freq 2 over 3 epochs: kNN after epochs 1 and 2 (the last), each the value
    main_linprobe.py --protocol knn gives for that epoch's checkpoint. With --knn_freq 1, a run
    resumed from epoch 0's checkpoint (saved before epoch 0's kNN) logs the losses and kNN of the
    run that never stopped: the monitor draws nothing from the training's random streams."""
    out = str(tmp_path / 'mae')
    argv = MAE + ['--epochs', '3', '--warmup_epochs', '1', '--save_freq', '1', '--num_workers', '2']
    main_pretrain.main(parse(argv + ['--knn_freq', '2', '--output_dir', out]))
    assert 'kNN top-1' in capsys.readouterr().out
    epochs = [line for line in log_lines(out) if 'epoch' in line]
    assert [('knn_acc1' in line) for line in epochs] == [False, True, True]
    assert epochs[1]['knn_seconds'] > 0 and epochs[1]['train_seconds'] > 0
    for epoch in (1, 2):
        linprobe = knn_of(os.path.join(out, f'checkpoint-{epoch}.pth'), tmp_path / f'knn{epoch}')
        assert abs(epochs[epoch]['knn_acc1'] - linprobe['acc1']) < 1e-6, (epoch, linprobe)
    assert epochs[2]['knn_acc1'] > 20.0  # 10 classes: chance is 10 %
    whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
    main_pretrain.main(parse(argv + ['--knn_freq', '1', '--output_dir', whole]))
    os.makedirs(split)
    shutil.copy(os.path.join(whole, 'checkpoint-0.pth'), os.path.join(split, 'checkpoint-last.pth'))
    main_pretrain.main(parse(argv + ['--knn_freq', '1', '--output_dir', split]))
    logged = [
        [(line['train_loss'], line['knn_acc1']) for line in log_lines(d) if 'epoch' in line]
        for d in (whole, split)
    ]
    assert logged[1] == logged[0][1:]


def test_knn_monitor_defaults_on_digits_only(tmp_path):
    args = parse(['--method', 'mae'])
    pretrain.resolve_args(args)
    assert args.knn_freq == pretrain.DIGITS_KNN_FREQ > 0
    args = parse(['--method', 'mae', '--data_path', str(tmp_path)])
    pretrain.resolve_args(args)
    assert args.knn_freq == 0
    args = parse(['--method', 'mae', '--knn_freq', '0'])
    pretrain.resolve_args(args)
    assert args.knn_freq == 0


def check_header(out, stdout, script, total_batch=None, lr=None):
    header = log_lines(out)[0]
    assert header['run'] == script
    assert (header['torch'], header['torchvision'], header['timm']) == (
        torch.__version__,
        torchvision.__version__,
        timm.__version__,
    )
    commit = subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True
    )
    if commit.returncode == 0:  # a git checkout: its commit (+dirty when tracked files changed)
        assert header['commit'].split('+')[0] == commit.stdout.strip()
    assert header['world_size'] == 1 and header['device'].startswith('CPU')
    assert (
        header['data'] == 'digits'
        and header['train_images'] == 1437
        and header['val_images'] == 360
    )
    assert header.get('total_batch') == total_batch and header.get('lr') == lr
    assert header['args']['output_dir'] == str(out)
    first = [
        re.sub(r'^\[\d\d:\d\d:\d\d\] ', '', line) for line in stdout.splitlines()[:2]
    ]  # the same, printed
    assert first[0].startswith(
        f'{script} | torch {torch.__version__}, torchvision {torchvision.__version__}, '
        f'timm {timm.__version__} | CPU'
    )
    assert first[1].startswith('1 process(es)') and '1437 train / 360 val images' in first[1]
    if total_batch:
        assert f'total batch {total_batch}, lr {lr:.3g}' in first[1]


def test_run_header_of_every_script(tmp_path, capsys):
    out = tmp_path / 'pretrain'
    main_pretrain.main(
        parse(
            MAE + ['--epochs', '1', '--batch_size', '64', '--blr', '2e-3', '--output_dir', str(out)]
        )
    )
    check_header(out, capsys.readouterr().out, 'main_pretrain.py', 64, 2e-3 * 64 / 256)
    out = tmp_path / 'finetune'
    parser = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()])
    main_finetune.main(
        parser.parse_args(
            '--epochs 1 --batch_size 32 --accum_iter 2 --blr 1e-3 --num_workers 0'.split()
            + ['--output_dir', str(out)]
        )
    )
    check_header(out, capsys.readouterr().out, 'main_finetune.py', 64, 1e-3 * 64 / 256)
    out = tmp_path / 'knn'
    knn_of('random', out)
    check_header(out, capsys.readouterr().out, 'main_linprobe.py')


def test_run_header_outside_a_git_checkout(tmp_path):
    """A copy of the scripts without .git: the header says so, and the run goes on."""
    copy = tmp_path / 'copy'
    subprocess.run(
        ['git', 'archive', '--format=tar', '-o', str(tmp_path / 'a.tar'), 'HEAD'],
        cwd=ROOT,
        check=True,
    )
    copy.mkdir()
    subprocess.run(['tar', '-xf', str(tmp_path / 'a.tar'), '-C', str(copy)], check=True)
    run = subprocess.run(
        [sys.executable, 'main_linprobe.py']
        + '--protocol knn --checkpoint random --num_workers 0'.split()
        + ['--output_dir', str(tmp_path / 'out')],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'commit none (not a git checkout)' in run.stdout.splitlines()[0]
    assert log_lines(tmp_path / 'out')[0]['commit'] is None
