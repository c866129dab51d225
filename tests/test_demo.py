"""scripts/demo.sh --quick: the whole miniature pipeline end to end, and its table."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

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
