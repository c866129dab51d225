"""DESIGN.md's layout, checked: a script never imports another script's building blocks (what two of
them share lives in util/ or a model file)."""
import ast
import os
import subprocess

from tests.conftest import ROOT

SCRIPTS = {name[:-3] for name in os.listdir(ROOT) if name.startswith('main_') and name.endswith('.py')}
# What a tool may use of a script: run it as its command line would (tools/eval_all.py does).
RUN_A_SCRIPT = {'get_args_parser', 'main'}
# Who may import a script to run it so: tools/, benchmarks/ and the SLURM launcher, which submits one.
RUNNERS = ('tools/', 'benchmarks/')
LAUNCHER = 'submitit_launch.py'


def python_files() -> list:
    """The non-test Python files of the checkout (git's list; every file below ROOT outside git)."""
    try:
        listed = subprocess.run(['git', 'ls-files', '*.py'], cwd=ROOT, capture_output=True, text=True, check=True)
        files = listed.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, names in os.walk(ROOT) for f in names
                 if f.endswith('.py') and '/.' not in d]
    return sorted(f for f in files if not f.startswith('tests/') and os.path.isfile(os.path.join(ROOT, f)))


def script_uses(path: str) -> list:
    """(line, what) for each use of a main_*.py script's building blocks in the file at `path`."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    own = os.path.basename(path)[:-3]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
            found.append((node.lineno, f'from {node.module} import {", ".join(a.name for a in node.names)}'))
        elif isinstance(node, ast.Import):
            runner = path.startswith(RUNNERS) or path == LAUNCHER
            found += [(node.lineno, f'import {a.name}') for a in node.names
                      if a.name in SCRIPTS and (own in SCRIPTS or not runner)]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in SCRIPTS
              and node.attr not in RUN_A_SCRIPT):
            found.append((node.lineno, f'{node.value.id}.{node.attr}'))
    return found


def test_no_script_imports_another_scripts_building_blocks():
    """main_*.py import no script; tools/, benchmarks/ and submitit_launch.py may run one
    (get_args_parser, main), nothing else."""
    assert {'main_pretrain', 'main_finetune', 'main_linprobe'} <= SCRIPTS
    uses = {path: script_uses(path) for path in python_files()}
    assert LAUNCHER in uses
    assert not {path: found for path, found in uses.items() if found}



def test_the_code_stays_small():
    """No file of non-test Python over 400 lines (`wc -l`; DESIGN.md, Layout). Issue 18's cap of
    4,000 lines in all is withdrawn (STYLE.md: it pushed statements together)."""
    lines = {path: sum(1 for _ in open(os.path.join(ROOT, path))) for path in python_files()}
    assert not {path: n for path, n in lines.items() if n > 400}
