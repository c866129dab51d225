"""The table of scripts/demo.sh, in the shape of the papers' tables, from each run's JSON lines in
its output_dir/log.txt (never from console text): rows are backbones with their pre-training epochs,
columns the evaluations, val top-1 (%). The Markdown goes to stdout and to output_dir/results.md.
python -m tools.demo_table --output_dir output/demo --command "scripts/demo.sh" --wall_time 812"""

import argparse
import datetime
import json
import pathlib

# (row label, pre-training folders in order, folder of its evaluations): the layout of scripts/demo.sh.
ROWS = [
    ('random init', [], 'random'),
    ("MoCo v3 (MimCo's teacher)", ['mocov3'], 'mocov3'),
    ('MimCo ← MoCo v3 teacher', ['mocov3', 'mimco'], 'mimco'),
    ('MAE', ['mae'], 'mae'),
    ('Layer Grafted: MAE → MoCo v3 (0.1,0.1,1)', ['mae', 'grafted'], 'grafted'),
]
COLUMNS = {
    'knn': 'kNN',
    'linear': 'linear',
    'logreg1': '1 % logreg',
    'logreg10': '10 % logreg',
    'finetune': 'fine-tune',
}  # folder of the evaluation run -> column title
STAGE_NAMES = {'mocov3': 'MoCo v3', 'mimco': 'MimCo', 'mae': 'MAE', 'grafted': 'grafted MoCo v3'}
# The papers' orderings (row, is at least / beats, row, column): MimCo's student at least equals its teacher
# (MimCo, Zhou et al. 2022); the grafted model beats both parents on 1 % labels (Layer Grafted, Table 1).
ORDERINGS = [
    ('mimco', '≥', 'mocov3', 'knn'),
    ('mimco', '≥', 'mocov3', 'logreg1'),
    ('grafted', '>', 'mae', 'logreg1'),
    ('grafted', '>', 'mocov3', 'logreg1'),
]


def read_log(*folders: str) -> list:
    """The JSON lines of the run's folders/.../log.txt; none if it did not run."""
    path = pathlib.Path(*folders, 'log.txt')
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )


def table(output_dir: str) -> tuple:
    """(Markdown table, {eval folder: {column folder: top-1 or None}}): each stage's epochs from the
    per-epoch lines of its log, each evaluation's top-1 from the last summary line of its log."""
    lines = [
        '| backbone (pre-training epochs) | ' + ' | '.join(COLUMNS.values()) + ' |',
        '|---|' + '---:|' * len(COLUMNS),
    ]
    values = {}
    for label, stages, row in ROWS:
        epochs = [
            [e['epoch'] for e in read_log(output_dir, s) if 'epoch' in e and 'summary' not in e]
            for s in stages
        ]
        if stages:
            label += ': ' + ' → '.join(
                f'{STAGE_NAMES[s]} {max(e) + 1 if e else "?"} ep' for s, e in zip(stages, epochs)
            )
        summaries = {
            c: [e['acc1'] for e in read_log(output_dir, 'eval', row, c) if 'summary' in e]
            for c in COLUMNS
        }
        values[row] = {column: acc1[-1] if acc1 else None for column, acc1 in summaries.items()}
        cells = ['–' if v is None else f'{v:.1f}' for v in values[row].values()]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), values


def main(args):
    text, values = table(args.output_dir)
    result = (
        f'Measured {datetime.date.today().isoformat()}'
        + (f' by `{args.command}`' if args.command else '')
        + (
            f', wall time {datetime.timedelta(seconds=int(args.wall_time))}'
            if args.wall_time
            else ''
        )
        + '. Val top-1 (%) on the 360 val digits; 1 % = 1 labelled image per class, 10 % = 14.\n\n'
        + text
        + '\n'
    )  # a blank line before the table (Markdown)
    shown = []
    for a, relation, b, column in ORDERINGS:
        x, y = values[a][column], values[b][column]
        if x is not None and y is not None:
            holds = x >= y if relation == '≥' else x > y
            shown.append(
                f'- {STAGE_NAMES[a]} {relation} {STAGE_NAMES[b]} on {COLUMNS[column]}: '
                f'{"yes" if holds else "no"} ({x:.1f} vs {y:.1f})'
            )
    if shown:
        result += "\nThe papers' orderings in this run:\n" + '\n'.join(shown) + '\n'
    pathlib.Path(args.output_dir, 'results.md').write_text(result)
    print(result, end='')
    return values


def get_args_parser():
    p = argparse.ArgumentParser('the table of scripts/demo.sh', add_help=False)
    p.add_argument('--output_dir', default='output/demo', help="the demo's output folder")
    p.add_argument('--command', default='', help='the command that made the runs, for the header')
    p.add_argument(
        '--wall_time', default=None, type=float, help='seconds the demo took, for the header'
    )
    return p


if __name__ == '__main__':
    main(
        argparse.ArgumentParser(
            'the table of scripts/demo.sh', parents=[get_args_parser()]
        ).parse_args()
    )
