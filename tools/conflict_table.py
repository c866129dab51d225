"""The gradient-conflict table over seeds: reads what tools/grad_conflict.py printed (one file a
seed, its panels in the same order in each) and writes one Markdown line per panel, a column per
row (embed, each block, norm), each cell the mean ± sample std over the files of one statistic:
the median cosine (with the slope of the blocks' medians), the share of negative cosines, or the
cosine of the summed gradients. docs/methods.md's conflict tables come from it.
python -m tools.conflict_table output/graft_study/seed*/conflict.txt --stat median
"""

import argparse
import re

from tools.demo_table import spread_cell
from util.errors import InputError, run_main

# A row of grad_conflict's table: name, median, q1, q3, share of negatives, [sum cos].
NUMBER = r'\s+(-?[\d.]+)'
ROW = re.compile(r'^\s*(embed|block \d+|norm)' + NUMBER * 4 + r'(\s+-?[\d.]+)?\s*$')
TIME = re.compile(r'^\[\d\d:\d\d:\d\d\] ')  # the prefix of prints after a script's logging setup
SLOPE = re.compile(r"^slope of the blocks' medians: ([+-]?[\d.]+) per block")
# --stat: (the field of a row, decimals, what the table's cells are)
STATS = {
    'median': ('median', 3, 'median of the per-sample cosines'),
    'neg': ('neg', 1, 'share of negative per-sample cosines, %'),
    'sum': ('sum', 3, 'cosine of the gradients summed over the samples'),
}


def read_panels(text: str) -> list:
    """[{'path', 'rows': {row: {'median', 'q1', 'q3', 'neg', 'sum' (None if not printed)}},
    'slope'}], one per checkpoint in the order printed."""
    panels = []
    for line in text.splitlines():
        line = TIME.sub('', line)
        if line.startswith('encoder: '):
            path = line.removeprefix('encoder: ').split(';')[0]
            panels.append({'path': path, 'rows': {}, 'slope': None})
            continue
        row = ROW.match(line)
        if row and panels:
            name, median, q1, q3, neg, total = row.groups()
            values = dict(median=float(median), q1=float(q1), q3=float(q3), neg=float(neg))
            values['sum'] = None if total is None else float(total)
            panels[-1]['rows'][name] = values
            continue
        slope = SLOPE.match(line)
        if slope and panels:
            panels[-1]['slope'] = float(slope.group(1))
    return panels


def label(path: str) -> str:
    """A panel's name: the checkpoint's last two path parts."""
    return '/'.join(path.split('/')[-2:])


def table(seeds: list, stat: str) -> str:
    """The Markdown table of one statistic: `seeds` is read_panels' output, one list per file."""
    counts = {len(panels) for panels in seeds}
    if len(counts) != 1:
        raise InputError(
            f'the files hold different numbers of checkpoints ({sorted(counts)}): give one '
            f'grad_conflict output per seed, each of the same checkpoints'
        )
    field, decimals, title = STATS[stat]
    lines = []
    header_names = None
    for i, panel in enumerate(seeds[0]):
        names = list(panel['rows'])
        if names != header_names:  # a new header where the rows change (a deeper model)
            header_names = names
            head = f'| checkpoint ({title}) | ' + ' | '.join(names) + ' |'
            if stat == 'median':
                head += ' slope / block |'
            lines += ['', head, '|---|' + '---:|' * (head.count('|') - 2)]
        cells = []
        for name in names:
            values = [panels[i]['rows'].get(name, {}).get(field) for panels in seeds]
            cells.append(spread_cell(values, signed=stat != 'neg', decimals=decimals))
        if stat == 'median':
            slopes = [panels[i]['slope'] for panels in seeds]
            cells.append(spread_cell(slopes, signed=True, decimals=4))
        lines.append(f'| {label(panel["path"])} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines).strip()


def main(args) -> str:
    seeds = []
    for path in args.files:
        try:
            with open(path) as f:
                panels = read_panels(f.read())
        except OSError as e:
            raise InputError(
                f'cannot read {path} ({e.strerror}): give grad_conflict outputs'
            ) from None
        if not panels:
            raise InputError(f'{path} holds no grad_conflict table: give its printed output')
        seeds.append(panels)
    markdown = table(seeds, args.stat)
    print(f'{len(seeds)} seeds: ' + ', '.join(args.files))
    print(markdown)
    return markdown


def get_args_parser():
    p = argparse.ArgumentParser('Gradient conflict over seeds', add_help=False)
    p.add_argument('files', nargs='+', help="tools/grad_conflict.py's printed output, one a seed")
    p.add_argument(
        '--stat',
        default='median',
        choices=list(STATS),
        help="median: the per-sample cosines' median and the slope; neg: the share of negative "
        'ones; sum: the cosine of the summed gradients',
    )
    return p


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Gradient conflict over seeds', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
