"""The README stays true: every flag of main_pretrain.py is in its table, and every command it shows
for our scripts parses with that script's own argument parser."""
import argparse
import importlib
import os
import re
import shlex

import pytest

from tests.conftest import ROOT
from tools.flags_table import flags_table

README = open(os.path.join(ROOT, 'README.md')).read()


def readme_commands():
    """(script, argv) for each `python X.py ...` / `torchrun ... X.py ...` line in a code block."""
    blocks = re.findall(r'```bash\n(.*?)```', README, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r'\\\n\s*', ' ', block)
        for line in joined.splitlines():
            line = line.split('#')[0].strip()
            found = re.search(r'(?:^|\s)((?:main_\w+|tools/\w+|benchmarks/\w+)\.py)(\s.*)?$', line)
            if found and ('python' in line or 'torchrun' in line):
                commands.append((found.group(1), shlex.split(found.group(2) or '')))
    return commands


def test_every_pretrain_flag_is_in_the_readme_table():
    import main_pretrain
    for row in flags_table(main_pretrain.get_args_parser()).splitlines()[2:]:
        flag = row.split('`')[1]
        assert f'`{flag}`' in README, f'{flag} is missing from the README flag table'


@pytest.mark.parametrize('script,argv', readme_commands())
def test_readme_command_parses(script, argv):
    module = importlib.import_module(script[:-3].replace('/', '.'))
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()], exit_on_error=False)
    argv = [os.path.expandvars(a) for a in argv]
    parser.parse_args(argv)
