"""The table of scripts/demo.sh, in the shape of the papers' tables, from each run's JSON lines in
its output_dir/log.txt (never from console text):

python tools/demo_table.py --output_dir output/demo --command "scripts/demo.sh" --wall_time 812

Rows are backbones with their pre-training epochs; columns are the evaluations, val top-1 (%).
The Markdown goes to stdout and to output_dir/results.md.
"""
import argparse
import datetime
import json
import os

# (row label, pre-training folders in order, folder of its evaluations): the layout of scripts/demo.sh.
ROWS = [
    ('random init', [], 'random'),
    ("MoCo v3 (MimCo's teacher)", ['mocov3'], 'mocov3'),
    ('MimCo ← MoCo v3 teacher', ['mocov3', 'mimco'], 'mimco'),
    ('MAE', ['mae'], 'mae'),
    ('Layer Grafted: MAE → MoCo v3 (0.1,0.1,1)', ['mae', 'grafted'], 'grafted'),
]
# (column title, folder of the evaluation run).
COLUMNS = [('kNN', 'knn'), ('linear', 'linear'), ('1 % logreg', 'logreg1'), ('10 % logreg', 'logreg10'),
           ('fine-tune', 'finetune')]
STAGE_NAMES = {'mocov3': 'MoCo v3', 'mimco': 'MimCo', 'mae': 'MAE', 'grafted': 'grafted MoCo v3'}


def read_log(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain_epochs(output_dir: str, stage: str):
    """Epochs trained, from the per-epoch lines of the stage's log.txt; None if it did not run."""
    epochs = [entry['epoch'] for entry in read_log(os.path.join(output_dir, stage, 'log.txt'))
              if 'epoch' in entry and 'summary' not in entry]
    return max(epochs) + 1 if epochs else None


def evaluation(output_dir: str, row: str, column: str):
    """Val top-1 of the last summary line of one evaluation run; None if it did not run."""
    summaries = [entry for entry in read_log(os.path.join(output_dir, 'eval', row, column, 'log.txt'))
                 if 'summary' in entry]
    return summaries[-1]['acc1'] if summaries else None


def row_label(output_dir: str, label: str, stages: list) -> str:
    if not stages:
        return label
    trained = ' → '.join(f'{STAGE_NAMES[s]} {pretrain_epochs(output_dir, s) or "?"} ep' for s in stages)
    return f'{label}: {trained}'


def table(output_dir: str) -> tuple:
    """(Markdown table, {eval folder: {column folder: top-1 or None}})."""
    lines = ['| backbone (pre-training epochs) | ' + ' | '.join(c for c, _ in COLUMNS) + ' |',
             '|---|' + '---:|' * len(COLUMNS)]
    values = {}
    for label, stages, row in ROWS:
        values[row] = {column: evaluation(output_dir, row, column) for _, column in COLUMNS}
        cells = ['–' if v is None else f'{v:.1f}' for v in values[row].values()]
        lines.append(f'| {row_label(output_dir, label, stages)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), values


# The papers' orderings (row, is at least / beats, row, column): MimCo's student at least equals its teacher
# (MimCo, Zhou et al. 2022); the grafted model beats both parents on 1 % labels (Layer Grafted, Table 1).
ORDERINGS = [('mimco', '>=', 'mocov3', 'knn'), ('mimco', '>=', 'mocov3', 'logreg1'),
             ('grafted', '>', 'mae', 'logreg1'), ('grafted', '>', 'mocov3', 'logreg1')]


def orderings(values: dict) -> list:
    """One line per ordering of ORDERINGS: whether this run shows it, with the two numbers."""
    columns = dict((folder, title) for title, folder in COLUMNS)
    lines = []
    for a, relation, b, column in ORDERINGS:
        x, y = values[a][column], values[b][column]
        if x is None or y is None:
            continue
        holds = x >= y if relation == '>=' else x > y
        lines.append(f'- {STAGE_NAMES[a]} {"≥" if relation == ">=" else ">"} {STAGE_NAMES[b]} on {columns[column]}: '
                     f'{"yes" if holds else "no"} ({x:.1f} vs {y:.1f})')
    return lines


def main(args):
    text, values = table(args.output_dir)
    header = [f'Measured {datetime.date.today().isoformat()}'
              + (f' by `{args.command}`' if args.command else '')
              + (f', wall time {datetime.timedelta(seconds=int(args.wall_time))}' if args.wall_time else '')
              + '. Val top-1 (%) on the 360 val digits; 1 % = 1 labelled image per class, 10 % = 14.', '']
    result = '\n'.join(header) + '\n' + text + '\n'  # a blank line before the table (Markdown)
    shown = orderings(values)
    if shown:
        result += '\nThe papers\' orderings in this run:\n' + '\n'.join(shown) + '\n'
    with open(os.path.join(args.output_dir, 'results.md'), 'w') as f:
        f.write(result)
    print(result, end='')
    return values


def get_args_parser():
    p = argparse.ArgumentParser('the table of scripts/demo.sh', add_help=False)
    p.add_argument('--output_dir', default='output/demo', help="the demo's output folder")
    p.add_argument('--command', default='', help='the command that made the runs, for the header')
    p.add_argument('--wall_time', default=None, type=float, help='seconds the demo took, for the header')
    return p


if __name__ == '__main__':
    main(argparse.ArgumentParser('the table of scripts/demo.sh', parents=[get_args_parser()]).parse_args())
