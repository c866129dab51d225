"""--subset_draws: several seeded draws of the labelled subset, each a whole run, and their mean and
sample std; draw 0 is the single draw of --seed that runs made before the flag existed."""

import argparse
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import ROOT, TORCHRUN

import main_finetune
import main_linprobe
from util import subsets
from util.digits import Digits
from util.errors import InputError

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def parse(module, argv: str):
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    return parser.parse_args(argv.split())


def summaries(path) -> list:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if 'summary' in line]


def naive_stratified(targets, shots: int, seed: int) -> list:
    """The subset as drawn before --subset_draws: one generator seeded by --seed, class by class."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    chosen = []
    for c in range(10):
        members = [i for i in range(len(targets)) if targets[i] == c]
        chosen.extend(int(i) for i in rng.choice(members, size=shots, replace=False))
    return sorted(chosen)


def test_draw_zero_is_the_seed_draw_and_draws_differ(tmp_path):
    digits = Digits(train=True)
    drawn = []
    for k in range(4):
        args = parse(main_linprobe, f'--shots_per_class 2 --seed 5 --subset_draw_index {k}')
        args.output_dir = str(tmp_path / str(k))
        drawn.append(subsets.label_subset(digits, args).indices)
    assert drawn[0] == naive_stratified(digits.targets, 2, seed=5)
    assert drawn[2] == naive_stratified(digits.targets, 2, seed=5 + 2 * subsets.DRAW_STRIDE)
    assert len({tuple(indices) for indices in drawn}) == 4


def test_logreg_draws_log_each_draw_and_their_mean_and_std(tmp_path):
    common = '--checkpoint random --protocol logreg --shots_per_class 1 --num_workers 0'
    one = tmp_path / 'one'
    single = main_linprobe.main(
        parse(main_linprobe, f'{common} --subset_draws 1 --output_dir {one}')
    )
    out = tmp_path / 'three'
    drawn = main_linprobe.main(
        parse(main_linprobe, f'{common} --subset_draws 3 --output_dir {out}')
    )
    per_draw = [summaries(out / f'draw{k}' / 'log.txt')[-1]['acc1'] for k in range(3)]
    # Draw 0 is the single run: the same images, the same random backbone, the same top-1.
    assert per_draw[0] == single['acc1']
    assert (out / 'draw0' / 'subset.txt').read_text() == (
        tmp_path / 'one' / 'subset.txt'
    ).read_text()
    listed = {(out / f'draw{k}' / 'subset.txt').read_text() for k in range(3)}
    assert len(listed) == 3
    summary = summaries(out / 'log.txt')[-1]
    assert summary['summary'] == 'logreg' and summary['draws'] == 3
    assert summary['acc1_draws'] == per_draw
    assert summary['acc1'] == pytest.approx(np.mean(per_draw), abs=1e-12)
    assert summary['acc1_std'] == pytest.approx(np.std(per_draw, ddof=1), abs=1e-12)
    assert summary['args']['subset_draws'] == 3 and drawn['acc1'] == summary['acc1']
    assert len(set(per_draw)) > 1  # one labelled image per class: the draw moves the top-1


def test_default_draws_and_refusals(tmp_path):
    def count(argv: str, few_shot: bool = True) -> int:
        return subsets.draw_count(parse(main_linprobe, argv), few_shot)

    assert count('--train_fraction 0.01') == subsets.DIGITS_DRAWS
    assert count('--train_fraction 0.01', few_shot=False) == 1  # kNN, linear probe
    assert count('') == 1 and count('--train_fraction 0.01 --subset_draws 1') == 1
    assert count('--train_fraction 0.01 --data_path /data') == 1  # not digits: opt in
    with pytest.raises(InputError, match='--subset_file'):
        count(f'--subset_file {tmp_path / "list.txt"} --subset_draws 3')
    with pytest.raises(InputError, match='needs a drawn subset'):
        count('--train_fraction 0.1 --subset_draws 3', few_shot=False)
    with pytest.raises(InputError, match='at least 1'):
        count('--train_fraction 0.1 --subset_draws 0')
    args = parse(main_linprobe, '--subset_file x.txt --subset_draw_index 1')
    with pytest.raises(InputError, match='fixed subset'):
        subsets.label_subset(Digits(train=True), args)


def test_finetune_draws(tmp_path):
    out = tmp_path / 'ft'
    argv = (
        '--shots_per_class 3 --subset_draws 2 --epochs 1 --warmup_epochs 0 --batch_size 10 '
        f'--drop_path 0 --num_workers 0 --print_freq 1000 --output_dir {out}'
    )
    metrics = main_finetune.main(parse(main_finetune, argv))
    per_draw = [summaries(out / f'draw{k}' / 'log.txt')[-1]['acc1'] for k in range(2)]
    assert metrics['acc1_draws'] == per_draw and metrics['n_train'] == 30
    assert metrics['acc1'] == pytest.approx(np.mean(per_draw))
    assert metrics['acc1_std'] == pytest.approx(np.std(per_draw, ddof=1))
    assert (out / 'draw1' / 'checkpoint-last.pth').is_file()
    assert (out / 'draw0' / 'subset.txt').read_text() != (out / 'draw1' / 'subset.txt').read_text()
    with pytest.raises(InputError, match='--resume'):
        main_finetune.main(parse(main_finetune, f'{argv} --resume {out}/draw0/x.pth'))


@pytest.mark.slow
def test_draws_under_torchrun(tmp_path):
    """Two processes run the draws one after the other in one process group (initialised once)."""
    argv = '--checkpoint random --protocol logreg --shots_per_class 1 --subset_draws 2'
    cmd = TORCHRUN + ['main_linprobe.py'] + argv.split()
    cmd += ['--num_workers', '0', '--output_dir', str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = summaries(tmp_path / 'log.txt')[-1]
    per_draw = [summaries(tmp_path / f'draw{k}' / 'log.txt')[-1]['acc1'] for k in range(2)]
    assert summary['draws'] == 2 and summary['acc1_draws'] == per_draw
