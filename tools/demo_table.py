"""The table of scripts/demo.sh (and of scripts/graft_study.sh, --layout graft_study), in the
shape of the papers' tables, from each run's JSON lines in
its output_dir/log.txt (never from console text): rows are backbones with their pre-training epochs,
columns the evaluations, val top-1 (%). The Markdown goes to stdout and to output_dir/results.md.
With seed folders (output_dir/seed<s>, `SEEDS=3 scripts/demo.sh`) each cell is the mean ± sample
std over the seeds, and each of the papers' orderings its mean difference ± std and in how many
seeds it holds.
python -m tools.demo_table --output_dir output/demo --command "scripts/demo.sh" --wall_time 812"""

import argparse
import datetime
import json
import operator
import pathlib
import re

import numpy as np

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


def seed_folders(output_dir: str) -> list:
    """The seed folders output_dir/seed<s> in seed order; [output_dir] itself if there are none."""
    found = []
    for path in pathlib.Path(output_dir).glob('seed*'):
        matched = re.fullmatch(r'seed(\d+)', path.name)
        if matched and path.is_dir():
            found.append((int(matched.group(1)), str(path)))
    if not found:
        return [output_dir]
    return [path for _, path in sorted(found)]


def mean_std(values: list) -> tuple:
    """(mean, sample std with ddof 1) of the measured values (None skipped); std None below two,
    both None for none."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None, None
    if len(measured) == 1:
        return measured[0], None
    return float(np.mean(measured)), float(np.std(measured, ddof=1))


def spread_cell(values: list, signed: bool = False, decimals: int = 1) -> str:
    """A table cell: the mean to `decimals` places (with its sign if `signed`), ± the sample std
    over seeds where there are two or more, '–' where the evaluation did not run, and `(k of n
    seeds)` where it ran in some seeds only (a seed still running, or stopped)."""
    mean, std = mean_std(values)
    if mean is None:
        return '–'
    sign = ''
    if signed:
        sign = '+'
    cell = f'{mean:{sign}.{decimals}f}'
    if std is not None:
        cell += f' ± {std:.{decimals}f}'
    measured = sum(value is not None for value in values)
    if measured < len(values):
        cell += f' ({measured} of {len(values)} seeds)'
    return cell


def table(folders: list, rows: list = ROWS) -> tuple:
    """(Markdown table, {eval folder: {column folder: [top-1 or None, one per seed folder]}}):
    each stage's epochs from the per-epoch lines of the first folder's logs, each evaluation's top-1
    from the last summary line of its log."""
    lines = [
        '| backbone (pre-training epochs) | ' + ' | '.join(COLUMNS.values()) + ' |',
        '|---|' + '---:|' * len(COLUMNS),
    ]
    values = {}
    for label, stages, row in rows:
        if stages:
            trained = [f'{STAGE_NAMES[s]} {stage_epochs(folders[0], s)} ep' for s in stages]
            label += ': ' + ' → '.join(trained)
        values[row] = {}
        for column in COLUMNS:
            values[row][column] = [last_top1(folder, row, column) for folder in folders]
        cells = [spread_cell(v) for v in values[row].values()]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), values


def ordering_line(claim: str, relation: str, xs: list, ys: list, decimals: int = 1) -> str:
    """`- claim: ...` over the seeds where both values were measured (xs, ys: one per seed): for one
    seed, does x `relation` y hold (x vs y); for several, the mean difference x - y ± its sample
    std and the seeds where it holds. None where no seed measured both."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if not pairs:
        return None
    holds = [RELATIONS[relation](x, y) for x, y in pairs]
    if len(pairs) == 1:
        x, y = pairs[0]
        answer = 'no'
        if holds[0]:
            answer = 'yes'
        return f'- {claim}: {answer} ({x:.{decimals}f} vs {y:.{decimals}f})'
    differences = [x - y for x, y in pairs]
    spread = spread_cell(differences, signed=True, decimals=decimals)
    return f'- {claim}: difference {spread}, holds in {sum(holds)} of {len(pairs)} seeds'


def ordering_lines(values: dict, orderings: list = ORDERINGS) -> list:
    """A line for each of `orderings` that was measured (ordering_line)."""
    shown = []
    for a, relation, b, column in orderings:
        claim = f'{STAGE_NAMES[a]} {relation} {STAGE_NAMES[b]} on {COLUMNS[column]}'
        line = ordering_line(claim, relation, values[a][column], values[b][column])
        if line is not None:
            shown.append(line)
    return shown


def measured_by(command: str, wall_time: float) -> str:
    """`Measured <date> by `command`, wall time h:mm:ss`, each part where it is known."""
    result = f'Measured {datetime.date.today().isoformat()}'
    if command:
        result += f' by `{command}`'
    if wall_time:
        result += f', wall time {datetime.timedelta(seconds=int(wall_time))}'
    return result


def main(args):
    rows, orderings = LAYOUTS[args.layout]
    folders = seed_folders(args.output_dir)
    text, values = table(folders, rows)
    result = measured_by(args.command, args.wall_time)
    result += '. Val top-1 (%) on the 360 val digits; 1 % = 1 labelled image per class, 10 % = 14'
    result += ' (logreg: the mean over the subset draws of each run, --subset_draws).'
    which = "The papers' orderings in this run:"
    if len(folders) > 1:
        result += f' Mean ± sample std over {len(folders)} pre-training seeds.'
        which = "The papers' orderings: the mean difference ± its sample std over the seeds:"
    # A blank line before the table (Markdown).
    result += '\n\n' + text + '\n'
    shown = ordering_lines(values, orderings)
    if shown:
        result += f'\n{which}\n' + '\n'.join(shown) + '\n'
    pathlib.Path(args.output_dir, 'results.md').write_text(result)
    print(result, end='')
    return values


def get_args_parser():
    p = argparse.ArgumentParser('the table of scripts/demo.sh', add_help=False)
    p.add_argument(
        '--output_dir',
        default='output/demo',
        help="the runs' output folder (seed<s>/ folders: one per seed)",
    )
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
