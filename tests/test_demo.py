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


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = str(tmp_path / 'demo')
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', 'demo.sh'), '--quick', '--output_dir', out],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
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
