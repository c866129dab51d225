"""Print the Markdown table of a script's flags, for the README:
python tools/flags_table.py main_pretrain"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def flags_table(parser: argparse.ArgumentParser) -> str:
    rows = ['| flag | default | what it does |', '|---|---|---|']
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == 'help':
            continue
        names = ', '.join(f'`{s}`' for s in action.option_strings)
        stated = '(default' in (action.help or '')  # the help says it better (e.g. 'cuda when available')
        default = '' if stated or action.default in (None, '', False) else f'`{action.default}`'
        choices = f' ({", ".join(map(str, action.choices))})' if action.choices else ''
        rows.append(f'| {names} | {default} | {action.help}{choices} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    module = importlib.import_module(sys.argv[1] if len(sys.argv) > 1 else 'main_pretrain')
    print(flags_table(module.get_args_parser()))
