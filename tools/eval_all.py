"""The five evaluations of one backbone in one process (one import of torch instead of five), each
by the real script's parser and main(): kNN, linear probe, 1 % and 10 % logistic regression
(main_linprobe.py) and a fine-tune (main_finetune.py). Each prints its command line, then writes its
JSON summary to <output_dir>/<protocol>/log.txt for tools/demo_table.py. Used by scripts/demo.sh:
python -m tools.eval_all --checkpoint output/demo/mimco/checkpoint-last.pth \
    --output_dir output/demo/eval/mimco"""

import argparse
import os
import shlex

import main_finetune
import main_linprobe
from util.errors import run_main

PROTOCOLS = ['knn', 'linear', 'logreg1', 'logreg10', 'finetune']


def get_args_parser():
    p = argparse.ArgumentParser('all evaluations of one backbone', add_help=False)
    p.add_argument(
        '--checkpoint',
        default='random',
        type=str,
        help='backbone (any format util/backbones reads), '
        'or `random` for the random-init baseline (fine-tuned from scratch)',
    )
    p.add_argument('--output_dir', default='output_dir/eval', help='one sub-folder per evaluation')
    p.add_argument(
        '--protocols', nargs='+', default=PROTOCOLS, choices=PROTOCOLS, help='evaluations to run'
    )
    p.add_argument('--linear_epochs', default=90, type=int, help='linear probe epochs (MAE: 90)')
    p.add_argument('--finetune_epochs', default=8, type=int, help='fine-tuning epochs')
    p.add_argument('--finetune_warmup', default=1, type=int, help='fine-tuning warm-up epochs')
    p.add_argument(
        '--finetune_blr', default=5e-4, type=float, help='fine-tuning base lr (total batch 256)'
    )
    p.add_argument('--num_workers', default=0, type=int, help='data loader workers of every run')
    p.add_argument(
        '--subset_draws',
        default=None,
        type=int,
        help='draws of the labelled subset of the 1 %% and 10 %% runs '
        "(default: main_linprobe.py's)",
    )
    p.add_argument(
        '--seed', default=0, type=int, help='seed of every run (subsets, heads, random init)'
    )
    return p


def protocol_argv(args) -> dict:
    """{protocol: the command line of its script, less --output_dir}."""
    common = ['--num_workers', str(args.num_workers), '--seed', str(args.seed)]
    probe = ['--checkpoint', args.checkpoint] + common
    # MAE warms its 90-epoch linear probe up for 10 epochs.
    linear_warmup = min(10, args.linear_epochs // 9)
    linear = ['--protocol', 'linear', '--epochs', str(args.linear_epochs)]
    linear += ['--warmup_epochs', str(linear_warmup)]
    # The random-init baseline is fine-tuned from scratch: no --finetune.
    finetune = []
    if args.checkpoint != 'random':
        finetune = ['--finetune', args.checkpoint]
    finetune += ['--epochs', str(args.finetune_epochs)]
    finetune += ['--warmup_epochs', str(args.finetune_warmup), '--blr', str(args.finetune_blr)]
    logreg = ['--protocol', 'logreg'] + probe
    if args.subset_draws is not None:
        logreg += ['--subset_draws', str(args.subset_draws)]
    return {
        'knn': ['--protocol', 'knn'] + probe,
        'linear': linear + probe,
        'logreg1': ['--train_fraction', '0.01'] + logreg,
        'logreg10': ['--train_fraction', '0.1'] + logreg,
        'finetune': finetune + common,
    }


def main(args):
    argv = protocol_argv(args)
    results = {}
    for name in PROTOCOLS:
        if name not in args.protocols:
            continue
        module = main_linprobe
        if name == 'finetune':
            module = main_finetune
        script = f'{module.__name__}.py'
        run_argv = argv[name] + ['--output_dir', os.path.join(args.output_dir, name)]
        print(f'[eval_all] {name}: python {script} {shlex.join(run_argv)}', flush=True)
        results[name] = module.main(module.get_args_parser().parse_args(run_argv))
    shown = ', '.join(f'{name} {metrics["acc1"]:.1f}' for name, metrics in results.items())
    print(f'[eval_all] {args.checkpoint}: {shown}', flush=True)
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser('all evaluations of one backbone', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
