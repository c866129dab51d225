"""The table of scripts/mimco_study.sh, MimCo's ablations in miniature: rows are the two teachers
and the students, columns kNN, linear probe and 1 % logistic regression (val top-1 %, from each
evaluation's log.txt) and the Fisher ratio of tools/visualize.py (its separability.json). Over
seed folders (output_dir/seed<s>) each cell is the mean ± sample std, and each of the paper's claims
the mean difference ± its std and in how many seeds it holds (tools/demo_table.py's helpers).
The Markdown goes to stdout and to output_dir/results.md.
python -m tools.study_table --output_dir output/mimco_study --command "scripts/mimco_study.sh"
"""

import argparse
import json
import pathlib

from tools import demo_table
from tools.demo_table import last_top1, measured_by, ordering_line, seed_folders, spread_cell

# (row label, folder of its pre-training run and evaluations): the layout of scripts/mimco_study.sh.
ROWS = [
    ('MAE (MIM alone)', 'mae'),
    ('MoCo v3 (CL)', 'mocov3'),
    ('MimCo ← MoCo v3: contrastive patch loss (ours)', 'mimco'),
    ("MimCo ← MoCo v3: --patch_loss l1 (the paper's baseline)", 'mimco_l1'),
    ('MimCo ← MoCo v3: --patch_loss smoothl1 (layer-normed targets)', 'mimco_smoothl1'),
    ('MimCo ← MoCo v3: no image loss (--img_loss none)', 'mimco_noimg'),
    ('MimCo ← MAE teacher', 'mimco_mae'),
]
# evaluation folder -> column title; 'fisher' is read from pictures/separability.json.
COLUMNS = {'knn': 'kNN', 'linear': 'linear', 'logreg1': '1 % logreg', 'fisher': 'Fisher ratio'}
# The paper's claims as orderings (claim, row, relation, row, column), from a reader's summary of
# MimCo (Zhou et al., 2022): the contrastive patch loss beats L1 regression of the teacher's
# features; the image-level loss helps linear separability; MIM alone is less separable than CL;
# the teacher is interchangeable (a non-contrastive one included: then the two students are alike,
# and the line shows how far apart they are).
CLAIMS = [
    ('contrastive patch loss > L1 regression on linear', 'mimco', '>', 'mimco_l1', 'linear'),
    ('contrastive patch loss > L1 regression on 1 %', 'mimco', '>', 'mimco_l1', 'logreg1'),
    ('image loss helps: with > without on linear', 'mimco', '>', 'mimco_noimg', 'linear'),
    ('image loss helps: with > without on Fisher ratio', 'mimco', '>', 'mimco_noimg', 'fisher'),
    ('MIM alone less separable: MoCo v3 > MAE on Fisher ratio', 'mocov3', '>', 'mae', 'fisher'),
    ('MIM alone less separable: MoCo v3 > MAE on linear', 'mocov3', '>', 'mae', 'linear'),
    (
        'teacher interchangeable: MoCo v3 teacher ≥ MAE teacher on kNN',
        'mimco',
        '≥',
        'mimco_mae',
        'knn',
    ),
]


def fisher(folder: str, row: str):
    """The Fisher ratio of a row's backbone in folder/pictures/separability.json; None if absent."""
    path = pathlib.Path(folder, 'pictures', 'separability.json')
    if not path.is_file():
        return None
    scores = json.loads(path.read_text())
    if row not in scores:
        return None
    return scores[row]['fisher']


def cell_values(folders: list, row: str, column: str) -> list:
    """A cell's value in each seed folder (None where it was not measured)."""
    if column == 'fisher':
        return [fisher(folder, row) for folder in folders]
    return [last_top1(folder, row, column) for folder in folders]


def study_table(folders: list) -> tuple:
    """(Markdown table, {row: {column: [value or None per seed]}})."""
    lines = [
        '| backbone | ' + ' | '.join(COLUMNS.values()) + ' |',
        '|---|' + '---:|' * len(COLUMNS),
    ]
    values = {}
    for label, row in ROWS:
        values[row] = {column: cell_values(folders, row, column) for column in COLUMNS}
        cells = []
        for column, measured in values[row].items():
            decimals = 1
            if column == 'fisher':
                decimals = 3
            cells.append(spread_cell(measured, decimals=decimals))
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), values


def claim_lines(values: dict) -> list:
    """A line for each of CLAIMS that was measured (demo_table.ordering_line)."""
    shown = []
    for claim, a, relation, b, column in CLAIMS:
        decimals = 1
        if column == 'fisher':
            decimals = 3
        line = ordering_line(claim, relation, values[a][column], values[b][column], decimals)
        if line is not None:
            shown.append(line)
    return shown


def main(args):
    folders = seed_folders(args.output_dir)
    text, values = study_table(folders)
    result = measured_by(args.command, args.wall_time)
    result += (
        '. Val top-1 (%) on the 360 val digits (1 %: one labelled image per class, the mean over '
        'the subset draws) and the Fisher ratio of the val features (tools/visualize.py).'
    )
    if len(folders) > 1:
        result += f' Mean ± sample std over {len(folders)} pre-training seeds.'
    result += '\n\n' + text + '\n'
    shown = claim_lines(values)
    if shown:
        result += "\nThe paper's claims (first minus second):\n" + '\n'.join(shown) + '\n'
    pathlib.Path(args.output_dir, 'results.md').write_text(result)
    print(result, end='')
    return values


def get_args_parser():
    p = demo_table.get_args_parser()
    p.set_defaults(output_dir='output/mimco_study')
    return p


if __name__ == '__main__':
    parser = argparse.ArgumentParser(
        'the table of scripts/mimco_study.sh', parents=[get_args_parser()]
    )
    main(parser.parse_args())
