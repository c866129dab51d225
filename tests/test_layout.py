"""The layout, checked: a script never imports another script's building blocks (what two of them
share lives in util/ or a top-level module); util/ is a leaf that imports nothing from the top
level; no file grows past 400 lines; ruff holds the style (ruff.toml)."""

import ast
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = {
    name[:-3] for name in os.listdir(ROOT) if name.startswith('main_') and name.endswith('.py')
}
# What a tool may use of a script: run it as its command line would (tools/eval_all.py does).
RUN_A_SCRIPT = {'get_args_parser', 'main'}
# Who may import a script to run it so: tools/, benchmarks/ and the SLURM launcher (it submits
# one).
RUNNERS = ('tools/', 'benchmarks/')
LAUNCHER = 'submitit_launch.py'


def python_files() -> list:
    """The non-test Python files of the checkout (git's list; every file below ROOT outside git)."""
    try:
        listed = subprocess.run(
            ['git', 'ls-files', '*.py'], cwd=ROOT, capture_output=True, text=True, check=True
        )
        files = listed.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [
            os.path.relpath(os.path.join(d, f), ROOT)
            for d, _, names in os.walk(ROOT)
            for f in names
            if f.endswith('.py') and '/.' not in d
        ]
    return sorted(
        f for f in files if not f.startswith('tests/') and os.path.isfile(os.path.join(ROOT, f))
    )


def script_uses(path: str) -> list:
    """(line, what) for each use of a main_*.py script's building blocks in the file at `path`."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    own = os.path.basename(path)[:-3]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
            found.append(
                (node.lineno, f'from {node.module} import {", ".join(a.name for a in node.names)}')
            )
        elif isinstance(node, ast.Import):
            runner = path.startswith(RUNNERS) or path == LAUNCHER
            found += [
                (node.lineno, f'import {a.name}')
                for a in node.names
                if a.name in SCRIPTS and (own in SCRIPTS or not runner)
            ]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in SCRIPTS
            and node.attr not in RUN_A_SCRIPT
        ):
            found.append((node.lineno, f'{node.value.id}.{node.attr}'))
    return found


def test_no_script_imports_another_scripts_building_blocks():
    """main_*.py import no script; tools/, benchmarks/ and submitit_launch.py may run one
    (get_args_parser, main), nothing else."""
    assert {'main_pretrain', 'main_finetune', 'main_linprobe'} <= SCRIPTS
    uses = {path: script_uses(path) for path in python_files()}
    assert LAUNCHER in uses
    assert not {path: found for path, found in uses.items() if found}


def top_level_modules() -> set:
    """What `import X` can name at the repository's top level: its .py files and its packages."""
    names = {'tools', 'benchmarks', 'tests'}
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            names.add(name[:-3])
    return names


def imported_modules(path: str) -> list:
    """(line, module) for each module the file at `path` imports."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_util_is_a_leaf():
    """util/ imports nothing from the repository's top level (as MAE's util/): no script, loop,
    model file, losses.py, pretrain_setup.py, tool or benchmark; only util/ itself and libraries."""
    top_level = top_level_modules()
    upward = {}
    for path in python_files():
        if not path.startswith('util/'):
            continue
        names = [(line, m) for line, m in imported_modules(path) if m.split('.')[0] in top_level]
        if names:
            upward[path] = names
    assert 'util/backbones.py' in python_files()  # the rule looks at the real files
    assert not upward


def test_no_file_over_400_lines():
    lines = {path: sum(1 for _ in open(os.path.join(ROOT, path))) for path in python_files()}
    assert not {path: n for path, n in lines.items() if n > 400}


@pytest.mark.skipif(
    shutil.which('ruff') is None, reason='ruff is not installed (requirements-dev.txt)'
)
@pytest.mark.parametrize('command', [['format', '--check'], ['check']])
def test_ruff_holds_the_style(command):
    """The whole tree as `ruff format` lays it out and as `ruff check` accepts it (ruff.toml): 100
    columns, one statement per line, no expression used as a statement. CI runs both too."""
    run = subprocess.run(['ruff', *command, '.'], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
