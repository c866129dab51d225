"""Labelled training subsets (the few-shot and semi-supervised protocols): SimCLR's subset lists
(--subset_file), stratified seeded draws (--train_fraction, --shots_per_class), and the loop over
several draws (--subset_draws) that reports their mean and spread."""

import argparse
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from util.data import dataset_name
from util.dist import get_rank
from util.errors import InputError
from util.logging import summarize

# Draws of the labelled subset a few-shot evaluation on digits averages by default: one labelled
# image per class moves logistic regression's top-1 by several points from draw to draw (20 draws on
# a 6-epoch MoCo v3: 41.5 ± 5.1 at 1 %, 78.6 ± 2.2 at 10 %); 10 draws bring the mean's standard
# error to ~1.6 points at 1 %, at ~1.5 s a draw (docs/evaluation.md).
DIGITS_DRAWS = 10
# Draw k of the subset is seeded by --seed + DRAW_STRIDE * k: draw 0 is the --seed draw (one draw,
# as before --subset_draws), and a prime stride keeps the draws of nearby --seed values apart.
DRAW_STRIDE = 1_000_003
# The metrics whose mean, sample std and per-draw values a run over draws reports.
DRAWN_METRICS = ('acc1', 'acc5', 'best_acc1')


def read_subset_file(path: str, names: list) -> list:
    """Sorted indices of the samples named in `path` (one name a line, blank lines skipped)."""
    if not os.path.isfile(path):
        raise InputError(
            f'--subset_file {path} does not exist: give a SimCLR-style list of file names'
        )
    with open(path) as f:
        wanted = [line.strip() for line in f if line.strip()]
    index = {name: i for i, name in enumerate(names)}
    if len(index) < len(names):
        raise InputError(
            f'--subset_file needs unique training file names, but {len(names) - len(index)} '
            f'names repeat across class folders: use --train_fraction instead'
        )
    unknown = [name for name in wanted if name not in index]
    if unknown:
        raise InputError(
            f'--subset_file {path}: {len(unknown)} of {len(wanted)} names are not training '
            f'images ({", ".join(unknown[:3])} ...); check that --data_path is the set the '
            f'list was made for (samples of sets without files are named {names[0]!r} ...)'
        )
    return sorted({index[name] for name in wanted})


SUBSET_FLAGS = ('subset_file', 'train_fraction', 'shots_per_class')


def _subset_flag(args) -> str:
    """The one labelled-subset flag given, or None; InputError for two of them or a bad value."""
    given = [flag for flag in SUBSET_FLAGS if getattr(args, flag, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InputError(
            f'--{" and --".join(given)} both choose the labelled subset: give only one'
        )
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise InputError(f'--train_fraction must be in (0, 1], got {args.train_fraction}')
    if args.shots_per_class is not None and args.shots_per_class < 1:
        raise InputError(f'--shots_per_class must be at least 1, got {args.shots_per_class}')
    return given[0]


def _sample_names(dataset) -> list:
    """One name per sample: the file name for ImageFolder (what SimCLR's subset lists hold),
    `<dataset>_<index>` for sets without files (digits_0, digits_1, ... in Digits' train order)."""
    if hasattr(dataset, 'samples'):
        return [os.path.basename(path) for path, _ in dataset.samples]
    return [f'{type(dataset).__name__.lower()}_{i}' for i in range(len(dataset))]


def _stratified_subset(targets: list, fraction: float, shots: int, seed: int) -> list:
    """Sorted indices holding `shots` or round(fraction * n_c) (at least 1) images of each class c,
    drawn without replacement by a generator seeded with `seed` alone."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    chosen = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if shots is not None:
            k = shots
        else:
            k = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return sorted(np.concatenate(chosen).tolist())


def label_subset(dataset, args) -> Dataset:
    """The labelled training subset chosen by --subset_file / --train_fraction / --shots_per_class,
    or the whole set; a drawn subset is draw --subset_draw_index of --seed (draw_seed). Its names
    go to output_dir/subset.txt, which --subset_file reads back."""
    flag = _subset_flag(args)
    if flag is None:
        return dataset
    names = _sample_names(dataset)
    if args.subset_file and args.subset_draw_index != 0:
        raise InputError(
            f'--subset_draw_index {args.subset_draw_index} with --subset_file: a list is one '
            f'fixed subset; drop --subset_draw_index'
        )
    if args.subset_file:
        indices = read_subset_file(args.subset_file, names)
    else:
        seed = draw_seed(args.seed, args.subset_draw_index)
        indices = _stratified_subset(
            dataset.targets, args.train_fraction, args.shots_per_class, seed
        )
    # Written even when read from --subset_file: every run's log folder says which images it used.
    listed = os.path.join(args.output_dir or '.', 'subset.txt')
    if args.output_dir and get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(listed, 'w') as f:
            f.writelines(f'{names[i]}\n' for i in indices)
    print(
        f'labelled subset: {len(indices)} of {len(dataset)} training images (--{flag}); '
        f'names in {listed}'
    )
    subset = torch.utils.data.Subset(dataset, indices)
    # torch's Subset has neither; the evaluations read both.
    subset.targets = [dataset.targets[i] for i in indices]
    subset.classes = dataset.classes
    return subset


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw `draw` of the labelled subset (draw 0: `seed` itself)."""
    return seed + DRAW_STRIDE * draw


def draw_count(args, few_shot: bool) -> int:
    """--subset_draws resolved: 1 without a drawn subset, DIGITS_DRAWS on digits, else 1.

    `few_shot`: this run trains on the subset (logistic regression, fine-tuning). Raises InputError
    for draws below 1, for several draws of a --subset_file (one fixed list) or of a protocol that
    does not train on the subset."""
    drawn = args.train_fraction is not None or args.shots_per_class is not None
    if args.subset_draws is None:
        if drawn and few_shot and dataset_name(args) == 'digits':
            return DIGITS_DRAWS
        return 1
    if args.subset_draws < 1:
        raise InputError(f'--subset_draws must be at least 1, got {args.subset_draws}')
    if args.subset_draws == 1:
        return 1
    if args.subset_file:
        raise InputError(
            f'--subset_draws {args.subset_draws} with --subset_file: a list is one fixed subset; '
            f'drop --subset_draws, or draw with --train_fraction / --shots_per_class'
        )
    if not drawn or not few_shot:
        raise InputError(
            f'--subset_draws {args.subset_draws} needs a drawn subset (--train_fraction or '
            f'--shots_per_class) and logistic regression or fine-tuning: drop --subset_draws'
        )
    return args.subset_draws


def draw_statistics(per_draw: list) -> dict:
    """Mean, sample standard deviation (ddof 1) and the values of each DRAWN_METRICS over the
    draws' metrics (a list of dicts), as `acc1`, `acc1_std`, `acc1_draws`; `n_train` of draw 0."""
    stats = {'draws': len(per_draw)}
    for name in DRAWN_METRICS:
        values = [metrics.get(name) for metrics in per_draw]
        if any(value is None for value in values):
            continue
        stats[name] = float(np.mean(values))
        stats[f'{name}_std'] = float(np.std(values, ddof=1))
        stats[f'{name}_draws'] = values
    if 'n_train' in per_draw[0]:
        stats['n_train'] = per_draw[0]['n_train']
    return stats


def draw_args(args, draw: int) -> argparse.Namespace:
    """The arguments of one draw's run: that draw alone, in output_dir/draw<k> (and log_dir's)."""
    one = argparse.Namespace(**vars(args))
    one.subset_draws = 1
    one.subset_draw_index = args.subset_draw_index + draw
    if args.output_dir:
        one.output_dir = os.path.join(args.output_dir, f'draw{draw}')
    if args.log_dir:
        one.log_dir = os.path.join(args.log_dir, f'draw{draw}')
    return one


def over_draws(main, args, draws: int, protocol: str, backbone: str) -> dict:
    """Runs a script's `main` once for each of `draws` seeded draws of the labelled subset, each a
    whole run in output_dir/draw<k> (its log, subset.txt, checkpoints), and logs the mean, the
    sample std and the per-draw values (draw_statistics) as the summary line of output_dir/log.txt.

    Returns that summary's metrics. Raises InputError for --resume (resume one draw instead: its
    folder resumes by itself)."""
    if args.resume:
        raise InputError(
            f'--resume with --subset_draws {draws}: each draw resumes from its own '
            f'output_dir/draw<k>/checkpoint-last.pth; drop --resume'
        )
    per_draw = []
    for draw in range(draws):
        one = draw_args(args, draw)
        metrics = main(one)
        seed = draw_seed(args.seed, one.subset_draw_index)
        print(f'subset draw {draw + 1}/{draws} (seed {seed}): top-1 {metrics["acc1"]:.2f}')
        per_draw.append(metrics)
    stats = draw_statistics(per_draw)
    print(
        f'{protocol} over {draws} subset draws: top-1 {stats["acc1"]:.2f} ± '
        f'{stats["acc1_std"]:.2f} (mean ± sample std)'
    )
    resolved = argparse.Namespace(**vars(args))
    resolved.subset_draws = draws
    return summarize(resolved, protocol, backbone, stats)
