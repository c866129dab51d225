"""The table of scripts/demo.sh (and of scripts/graft_study.sh, --layout graft_study), in the
shape of the papers' tables, from each run's JSON lines in
its output_dir/log.txt (never from console text): rows are backbones with their pre-training epochs,
columns the evaluations, val top-1 (%). The Markdown goes to stdout and to output_dir/results.md.
python -m tools.demo_table --output_dir output/demo --command "scripts/demo.sh" --wall_time 812"""

import argparse
import datetime
import json
import operator
import pathlib

# (row label, pre-training folders in order, folder of its evaluations): the layout of
# scripts/demo.sh.
ROWS = [
    ('random init', [], 'random'),
    ("MoCo v3 (MimCo's teacher)", ['mocov3'], 'mocov3'),
    ('MimCo ← MoCo v3 teacher', ['mocov3', 'mimco'], 'mimco'),
    ('MAE', ['mae'], 'mae'),
    ('Layer Grafted: MAE → MoCo v3 (0.1,0.1,1)', ['mae', 'grafted'], 'grafted'),
]
# folder of the evaluation run -> column title
COLUMNS = {
    'knn': 'kNN',
    'linear': 'linear',
    'logreg1': '1 % logreg',
    'logreg10': '10 % logreg',
    'finetune': 'fine-tune',
}
# The layout of scripts/graft_study.sh: Layer Grafted's Table 1 in miniature.
STUDY_ROWS = [
    ('MAE', ['mae'], 'mae'),
    ('MoCo v3', ['mocov3'], 'mocov3'),
    ('MTL: MAE + MoCo v3 on one encoder', ['mtl'], 'mtl'),
    ('reverse cascade: MoCo v3 → MAE (0.1,0.1,1)', ['mocov3', 'reverse'], 'reverse'),
    ('MAE → MoCo v3, blocks 0-3 frozen', ['mae', 'frozen'], 'frozen'),
    ('MAE → MoCo v3 (1,1,1)', ['mae', 'grafted_111'], 'grafted_111'),
    ('Layer Grafted: MAE → MoCo v3 (0.1,0.1,1)', ['mae', 'grafted'], 'grafted'),
]
STAGE_NAMES = {
    'mocov3': 'MoCo v3',
    'mimco': 'MimCo',
    'mae': 'MAE',
    'grafted': 'grafted MoCo v3',
    'mtl': 'MTL',
    'reverse': 'MAE on MoCo v3 (reverse)',
    'frozen': 'MoCo v3 (blocks 0-3 frozen)',
    'grafted_111': 'MoCo v3 (1,1,1)',
}
# The papers' orderings (row, is at least / beats, row, column): MimCo's student at least equals
# its teacher (MimCo, Zhou et al. 2022); the grafted model beats both parents on 1 % labels (Layer
# Grafted, Table 1).
ORDERINGS = [
    ('mimco', '≥', 'mocov3', 'knn'),
    ('mimco', '≥', 'mocov3', 'logreg1'),
    ('grafted', '>', 'mae', 'logreg1'),
    ('grafted', '>', 'mocov3', 'logreg1'),
]
# Layer Grafted's (Table 1 and its text): MTL is not above the better parent on 1 %; the reverse
# cascade falls below MTL; freezing the MIM blocks is below the small-lr cascade, which beats MTL
# and both parents.
STUDY_ORDERINGS = [
    ('mtl', '≤', 'mae', 'logreg1'),
    ('mtl', '≤', 'mocov3', 'logreg1'),
    ('reverse', '<', 'mtl', 'logreg1'),
    ('frozen', '<', 'grafted', 'logreg1'),
    ('grafted', '>', 'mtl', 'logreg1'),
    ('grafted', '>', 'mae', 'logreg1'),
    ('grafted', '>', 'mocov3', 'logreg1'),
]
LAYOUTS = {'demo': (ROWS, ORDERINGS), 'graft_study': (STUDY_ROWS, STUDY_ORDERINGS)}
RELATIONS = {'≥': operator.ge, '>': operator.gt, '≤': operator.le, '<': operator.lt}


def read_log(*folders: str) -> list:
    """The JSON lines of the run's folders/.../log.txt; none if it did not run."""
    path = pathlib.Path(*folders, 'log.txt')
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_epochs(output_dir: str, stage: str) -> str:
    """The epochs a pre-training stage ran, from the per-epoch lines of its log; '?' if none."""
    log = read_log(output_dir, stage)
    epochs = [e['epoch'] for e in log if 'epoch' in e and 'summary' not in e]
    if not epochs:
        return '?'
    return str(max(epochs) + 1)


def last_top1(output_dir: str, row: str, column: str):
    """The top-1 of the last summary line of an evaluation's log; None if it did not run."""
    log = read_log(output_dir, 'eval', row, column)
    acc1 = [e['acc1'] for e in log if 'summary' in e]
    if not acc1:
        return None
    return acc1[-1]


def top1_cell(value) -> str:
    """A table cell: the top-1 to one decimal, '–' where the evaluation did not run."""
    if value is None:
        return '–'
    return f'{value:.1f}'


def table(output_dir: str, rows: list = ROWS) -> tuple:
    """(Markdown table, {eval folder: {column folder: top-1 or None}}): each stage's epochs from the
    per-epoch lines of its log, each evaluation's top-1 from the last summary line of its log."""
    lines = [
        '| backbone (pre-training epochs) | ' + ' | '.join(COLUMNS.values()) + ' |',
        '|---|' + '---:|' * len(COLUMNS),
    ]
    values = {}
    for label, stages, row in rows:
        if stages:
            trained = [f'{STAGE_NAMES[s]} {stage_epochs(output_dir, s)} ep' for s in stages]
            label += ': ' + ' → '.join(trained)
        values[row] = {column: last_top1(output_dir, row, column) for column in COLUMNS}
        cells = [top1_cell(v) for v in values[row].values()]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), values


def ordering_lines(values: dict, orderings: list = ORDERINGS) -> list:
    """A line for each of `orderings` whose two cells were measured: does it hold in this run."""
    shown = []
    for a, relation, b, column in orderings:
        x = values[a][column]
        y = values[b][column]
        if x is None or y is None:
            continue
        answer = 'no'
        if RELATIONS[relation](x, y):
            answer = 'yes'
        shown.append(
            f'- {STAGE_NAMES[a]} {relation} {STAGE_NAMES[b]} on {COLUMNS[column]}: '
            f'{answer} ({x:.1f} vs {y:.1f})'
        )
    return shown


def main(args):
    rows, orderings = LAYOUTS[args.layout]
    text, values = table(args.output_dir, rows)
    result = f'Measured {datetime.date.today().isoformat()}'
    if args.command:
        result += f' by `{args.command}`'
    if args.wall_time:
        result += f', wall time {datetime.timedelta(seconds=int(args.wall_time))}'
    result += '. Val top-1 (%) on the 360 val digits; 1 % = 1 labelled image per class, 10 % = 14.'
    # A blank line before the table (Markdown).
    result += '\n\n' + text + '\n'
    shown = ordering_lines(values, orderings)
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
        '--layout',
        default='demo',
        choices=list(LAYOUTS),
        help='rows and orderings: scripts/demo.sh or scripts/graft_study.sh',
    )
    p.add_argument(
        '--wall_time', default=None, type=float, help='seconds the demo took, for the header'
    )
    return p


if __name__ == '__main__':
    parser = argparse.ArgumentParser('the table of scripts/demo.sh', parents=[get_args_parser()])
    main(parser.parse_args())
