"""scripts/demo.sh --quick: the whole miniature pipeline end to end, and its table."""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MOCO, ROOT, parse

import main_pretrain
from tools import demo_table

ROWS = [
    'random init',
    "MoCo v3 (MimCo's teacher): MoCo v3 1 ep",
    'MimCo ← MoCo v3 teacher: MoCo v3 1 ep → MimCo 1 ep',
    'MAE: MAE 1 ep',
    'Layer Grafted: MAE → MoCo v3 (0.1,0.1,1): MAE 1 ep → grafted MoCo v3 1 ep',
]


def run_quick(script: str, out: str, cwd):
    """scripts/<script> --quick --output_dir <out>, checked to exit 0; its completed process."""
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', script), '--quick', '--output_dir', out],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = str(tmp_path / 'demo')
    run = run_quick('demo.sh', out, tmp_path)
    assert len(re.findall(r'stage \d/9', run.stdout)) == 9, run.stdout  # a progress line per stage
    with open(os.path.join(out, 'results.md')) as f:
        written = f.read()
    assert written.strip() in run.stdout  # the table printed is the one written
    rows = [
        line
        for line in written.splitlines()
        if line.startswith('| ') and not line.startswith('| backbone')
    ]
    assert [row.split(' | ')[0][2:] for row in rows] == ROWS
    for row in rows:
        cells = [cell.strip() for cell in row.strip('|').split('|')[1:]]
        assert len(cells) == 5 and all(0.0 <= float(cell) <= 100.0 for cell in cells), row
    assert 'by `scripts/demo.sh --quick --output_dir' in written
    orderings = [line for line in written.splitlines() if line.startswith('- ')]
    assert len(orderings) == 4 and all(
        re.search(r': (yes|no) \(\d+\.\d vs \d+\.\d\)$', line) for line in orderings
    ), written


STUDY_ROWS = [
    'MAE: MAE 1 ep',
    'MoCo v3: MoCo v3 1 ep',
    'MTL: MAE + MoCo v3 on one encoder: MTL 1 ep',
    'reverse cascade: MoCo v3 → MAE (0.1,0.1,1): MoCo v3 1 ep → MAE on MoCo v3 (reverse) 1 ep',
    'MAE → MoCo v3, blocks 0-3 frozen: MAE 1 ep → MoCo v3 (blocks 0-3 frozen) 1 ep',
    'MAE → MoCo v3 (1,1,1): MAE 1 ep → MoCo v3 (1,1,1) 1 ep',
    'Layer Grafted: MAE → MoCo v3 (0.1,0.1,1): MAE 1 ep → grafted MoCo v3 1 ep',
]


@pytest.mark.slow  # ~10 min on 2 shared cores
def test_graft_study_quick(tmp_path):
    """scripts/graft_study.sh --quick: the seven Table 1 rows, four evaluations each, the seven
    orderings, and the conflict of four checkpoints (eight rows each) in results.md and a figure."""
    out = str(tmp_path / 'study')
    run = run_quick('graft_study.sh', out, tmp_path)
    assert len(re.findall(r'stage \d+/15', run.stdout)) == 15, run.stdout
    with open(os.path.join(out, 'results.md')) as f:
        written = f.read()
    rows = [line for line in written.splitlines() if line.startswith('| ') and ' ep |' in line]
    assert [row.split(' | ')[0][2:] for row in rows] == STUDY_ROWS
    for row in rows:
        cells = [cell.strip() for cell in row.strip('|').split('|')[1:]]
        assert cells[-1] == '–' and all(0.0 <= float(cell) <= 100.0 for cell in cells[:4]), row
    orderings = [line for line in written.splitlines() if line.startswith('- ')]
    assert len(orderings) == 7, written
    assert len(re.findall(r'^ +block 5 +-?\d\.\d{3}', written, flags=re.M)) == 4, written
    assert written.count('heads from the file: all (MTL checkpoint') == 2
    assert os.path.getsize(os.path.join(out, 'conflict.png')) > 5000


def fake_demo(root, tops: dict, epochs: int = 3):
    """A demo's output folder without running it: each stage's per-epoch log lines and each
    evaluation's summary line, top-1 tops[(row, column)]."""
    for stage in demo_table.STAGE_NAMES:
        lines = [json.dumps({'epoch': e, 'train_loss': 1.0}) for e in range(epochs)]
        os.makedirs(root / stage)
        (root / stage / 'log.txt').write_text('\n'.join(lines) + '\n')
    for (row, column), top1 in tops.items():
        os.makedirs(root / 'eval' / row / column)
        summary = {'summary': column, 'acc1': top1, 'args': {}}
        (root / 'eval' / row / column / 'log.txt').write_text(json.dumps(summary) + '\n')


def test_demo_table_over_seeds(tmp_path, capsys):
    """Three seeds: each cell the mean ± sample std, each ordering the mean difference ± its
    std and the seeds where it holds; a second call on the same folders gives the same table."""
    rng = np.random.default_rng(0)
    tops = []
    for seed in range(3):
        cells = {}
        for _, _, row in demo_table.ROWS:
            for column in demo_table.COLUMNS:
                cells[(row, column)] = float(rng.uniform(20, 95))
        tops.append(cells)
        fake_demo(tmp_path / f'seed{seed}', cells)
    (tmp_path / 'seed9.txt').write_text('not a seed folder')
    args = argparse.Namespace(
        output_dir=str(tmp_path), command='SEEDS=3 x', wall_time=61, layout='demo'
    )
    values = demo_table.main(args)
    printed = capsys.readouterr().out
    assert printed == (tmp_path / 'results.md').read_text()
    assert 'Mean ± sample std over 3 pre-training seeds' in printed
    knn = [tops[s][('mimco', 'knn')] for s in range(3)]
    assert values['mimco']['knn'] == knn
    row = next(line for line in printed.splitlines() if line.startswith('| MimCo'))
    assert row.split(' | ')[0] == '| MimCo ← MoCo v3 teacher: MoCo v3 3 ep → MimCo 3 ep'
    assert row.split(' | ')[1] == f'{np.mean(knn):.1f} ± {np.std(knn, ddof=1):.1f}'
    orderings = [line for line in printed.splitlines() if line.startswith('- ')]
    assert len(orderings) == 4
    for line, (a, relation, b, column) in zip(orderings, demo_table.ORDERINGS):
        x = np.array([tops[s][(a, column)] for s in range(3)])
        y = np.array([tops[s][(b, column)] for s in range(3)])
        holds = int((x > y).sum())
        if relation == '≥':
            holds = int((x >= y).sum())
        expected = f'{np.mean(x - y):+.1f} ± {np.std(x - y, ddof=1):.1f}, holds in {holds} of 3'
        assert line.endswith(expected + ' seeds'), (line, expected)
    demo_table.main(args)
    assert capsys.readouterr().out == printed


def test_demo_table_one_seed_and_missing_cells(tmp_path, capsys):
    fake_demo(tmp_path, {('mimco', 'knn'): 92.84, ('mocov3', 'knn'): 91.43})
    args = argparse.Namespace(output_dir=str(tmp_path), command='', wall_time=None, layout='demo')
    demo_table.main(args)
    printed = capsys.readouterr().out
    assert '- MimCo ≥ MoCo v3 on kNN: yes (92.8 vs 91.4)' in printed
    assert len([line for line in printed.splitlines() if line.startswith('- ')]) == 1
    assert '± ' not in printed and '| 92.8 | – |' in printed


def test_demo_table_says_which_cells_miss_a_seed(tmp_path, capsys):
    """A seed still running: its cells count as missing, and the cells say over how many seeds
    they are; the orderings use the seeds that measured both sides."""
    fake_demo(tmp_path / 'seed0', {('mimco', 'knn'): 92.0, ('mocov3', 'knn'): 90.0})
    fake_demo(tmp_path / 'seed1', {('mimco', 'knn'): 94.0, ('mocov3', 'knn'): 89.0})
    fake_demo(tmp_path / 'seed2', {('mimco', 'knn'): 93.0})
    args = argparse.Namespace(output_dir=str(tmp_path), command='', wall_time=None, layout='demo')
    demo_table.main(args)
    printed = capsys.readouterr().out
    mimco = next(line for line in printed.splitlines() if line.startswith('| MimCo'))
    mocov3 = next(line for line in printed.splitlines() if line.startswith('| MoCo v3'))
    assert mimco.split(' | ')[1] == '93.0 ± 1.0'
    assert mocov3.split(' | ')[1] == f'89.5 ± {np.std([90.0, 89.0], ddof=1):.1f} (2 of 3 seeds)'
    assert '- MimCo ≥ MoCo v3 on kNN: difference +3.5 ± 2.1, holds in 2 of 2 seeds' in printed


def fake_python(tmp_path):
    """A stand-in for python that records each command line in calls.txt and prints what the
    scripts grep, but runs the table tools (tools.demo_table, tools.study_table) and `-c` (the
    reuse check of scripts/lib/reuse.sh) for real."""
    fake = tmp_path / 'python'
    calls = tmp_path / 'calls.txt'
    fake.write_text(
        '#!/usr/bin/env bash\n'
        'case "$1 $2" in "-m tools.demo_table"|"-m tools.study_table"|-c*)\n'
        f'  exec {sys.executable} "$@" ;;\n'
        'esac\n'
        f'echo "$*" >> {calls}\n'
        'echo "training time 0:00:01"\n'
    )
    fake.chmod(0o755)
    return str(fake), calls


def run_script(script: str, tmp_path, *argv, **env):
    fake, calls = fake_python(tmp_path)
    run = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', script), *argv],
        env=dict(os.environ, PYTHON=fake, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, calls.read_text().splitlines()


def test_demo_seeds_run_the_pipeline_per_seed(tmp_path):
    """SEEDS=2: every stage of every seed runs with its --seed into seed<s>/."""
    out = tmp_path / 'demo'
    run, commands = run_script('demo.sh', tmp_path, '--quick', '--output_dir', str(out), SEEDS='2')
    assert len(commands) == 2 * 9
    for seed in range(2):
        mine = [c for c in commands if f'{out}/seed{seed}/' in c]
        assert len(mine) == 9 and all(f'--seed {seed} ' in c for c in mine), mine
    assert 'seed 1, stage 9/9' in run.stdout
    assert 'by `SEEDS=2 scripts/demo.sh --quick --output_dir' in (out / 'results.md').read_text()
    bad = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', 'demo.sh'), '--seeds', '0'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith('error: SEEDS=0')


def test_mimco_study_runs_each_ablation(tmp_path):
    """The study's 7 pre-trainings with their ablation flags, evaluated by kNN, linear and 1 %,
    the Fisher ratios by tools.visualize, and the table with a row for each backbone."""
    out = tmp_path / 'study'
    run, commands = run_script('mimco_study.sh', tmp_path, '--quick', '--output_dir', str(out))
    pretrain = [c for c in commands if c.startswith('main_pretrain.py')]
    flags = {c.split('--output_dir ')[1].split()[0].split('/')[-1]: c for c in pretrain}
    assert sorted(flags) == sorted(['mocov3', 'mae', *STUDENTS])
    assert '--patch_loss l1' in flags['mimco_l1'] and '--img_loss none' in flags['mimco_noimg']
    assert '--patch_loss smoothl1' in flags['mimco_smoothl1']
    assert '--patch_loss' not in flags['mimco'] and '--img_loss' not in flags['mimco']
    assert f'--teacher {out}/mae/checkpoint-last.pth' in flags['mimco_mae']
    assert f'--teacher {out}/mocov3/checkpoint-last.pth' in flags['mimco_l1']
    evaluations = [c for c in commands if c.startswith('-m tools.eval_all')]
    assert len(evaluations) == 7
    assert all('--protocols knn linear logreg1' in c for c in evaluations)
    assert all('--subset_draws 2 ' in c for c in evaluations)  # --quick: 2 draws, not 10
    assert len([c for c in commands if c.startswith('-m tools.visualize')]) == 1
    assert 'stage 8/8' in run.stdout
    rows = [line for line in (out / 'results.md').read_text().splitlines() if line.startswith('| ')]
    assert len(rows) == 1 + 7  # the header and a row per backbone


STUDENTS = ['mimco', 'mimco_l1', 'mimco_smoothl1', 'mimco_noimg', 'mimco_mae']


def fake_run(folder, epochs: int, seed: int):
    """A finished run's checkpoint-last.pth, as much of it as the reuse check reads."""
    folder.mkdir(parents=True)
    torch.save({'args': {'epochs': epochs, 'seed': seed}}, folder / 'checkpoint-last.pth')


def test_studies_reuse_the_demo_runs_of_the_same_seed_and_epochs(tmp_path):
    """--seed 1 with the demo's seed-1 runs: the MimCo study takes its teachers and MimCo student,
    the graft study its MAE, MoCo v3 and grafted runs; every other run trains with --seed 1. A
    demo run of other epochs is refused in one line, exit 2."""
    demo = tmp_path / 'demo'
    for name in ('mocov3', 'mae', 'mimco', 'grafted'):
        fake_run(demo / name, epochs=1, seed=1)
    out = tmp_path / 'study'
    argv = ['--quick', '--seed', '1', '--output_dir', str(out)]
    run, commands = run_script('mimco_study.sh', tmp_path, *argv, DEMO_DIR=str(demo))
    trained = [c for c in commands if c.startswith('main_pretrain.py')]
    assert len(trained) == 4 and all('--seed 1 ' in c for c in trained), trained
    folders = [c.split('--output_dir ')[1].split()[0] for c in trained]
    assert sorted(folders) == sorted(f'{out}/{name}' for name in STUDENTS if name != 'mimco')
    assert run.stdout.count("    the demo's: ") == 3
    assert (out / 'mimco' / 'checkpoint-last.pth').is_file()

    graft = tmp_path / 'graft'
    argv = ['--quick', '--seed', '1', '--from_demo', str(demo), '--output_dir', str(graft)]
    (tmp_path / 'calls').mkdir()
    run, commands = run_script('graft_study.sh', tmp_path / 'calls', *argv)
    trained = [c for c in commands if c.startswith('main_pretrain.py')]
    assert len(trained) == 4 and all('--seed 1 ' in c for c in trained), trained
    assert run.stdout.count('    reused ') == 3

    fake_run(tmp_path / 'other' / 'mae', epochs=2, seed=1)
    argv = ['--quick', '--seed', '1', '--from_demo', str(tmp_path / 'other')]
    bad = subprocess.run(
        [
            'bash',
            os.path.join(ROOT, 'scripts', 'graft_study.sh'),
            *argv,
            '--output_dir',
            str(graft),
        ],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.startswith('error: ') and 'ran (epochs seed) 2 1, not 1 1' in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_pretraining_seeds_differ_and_repeat(tmp_path):
    """What SEEDS rests on: --seed 1 pre-trains other weights than --seed 0, and --seed 0 run
    again gives the same weights bit for bit (so the same table)."""
    weights = []
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        out = str(tmp_path / name)
        argv = ['--epochs', '1', '--warmup_epochs', '0', '--knn_freq', '0', '--seed', str(seed)]
        main_pretrain.main(parse(MOCO + argv + ['--output_dir', out]))
        saved = torch.load(os.path.join(out, 'checkpoint-last.pth'), weights_only=True)
        weights.append(saved['model'])
    same = weights[0]
    for name, value in same.items():
        assert torch.equal(value, weights[1][name]), name
    differ = [name for name, value in same.items() if not torch.equal(value, weights[2][name])]
    assert len(differ) > len(same) // 2, differ


@pytest.mark.slow
def test_mimco_study_quick(tmp_path):
    out = tmp_path / 'study'
    run = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', 'mimco_study.sh'), '--quick', '--output_dir', out],
        cwd=tmp_path,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = (out / 'results.md').read_text()
    rows = [
        line for line in written.splitlines() if line.startswith('| ') and '| kNN |' not in line
    ]
    assert len(rows) == 7
    for row in rows:
        cells = [cell.strip() for cell in row.strip('|').split('|')[1:]]
        assert len(cells) == 4 and all(float(cell) >= 0 for cell in cells), row
    assert len([line for line in written.splitlines() if line.startswith('- ')]) == 7
