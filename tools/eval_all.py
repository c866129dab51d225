"""The five evaluations of one backbone, in one process (one import of torch instead of five), each
by the real script's parser and main(): kNN, linear probe, 1 % and 10 % logistic regression
(main_linprobe.py) and a fine-tune (main_finetune.py). Each prints its command line first and writes
its JSON summary to <output_dir>/<knn|linear|logreg1|logreg10|finetune>/log.txt, which
tools/demo_table.py reads. Used by scripts/demo.sh:

python tools/eval_all.py --checkpoint output/demo/mimco/checkpoint-last.pth --output_dir output/demo/eval/mimco
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
from util.errors import run_main  # noqa: E402

PROTOCOLS = ['knn', 'linear', 'logreg1', 'logreg10', 'finetune']


def get_args_parser():
    p = argparse.ArgumentParser('all evaluations of one backbone', add_help=False)
    p.add_argument('--checkpoint', default='random', type=str,
                   help='backbone (any format util/backbones reads), or `random` for the random-init '
                        'baseline (fine-tuned from scratch)')
    p.add_argument('--output_dir', default='output_dir/eval', help='one sub-folder per evaluation')
    p.add_argument('--protocols', nargs='+', default=PROTOCOLS, choices=PROTOCOLS, help='evaluations to run')
    p.add_argument('--linear_epochs', default=90, type=int, help='linear probe epochs (MAE: 90)')
    p.add_argument('--finetune_epochs', default=8, type=int, help='fine-tuning epochs')
    p.add_argument('--finetune_warmup', default=1, type=int, help='fine-tuning warm-up epochs')
    p.add_argument('--finetune_blr', default=5e-4, type=float, help='fine-tuning base lr (total batch 256)')
    p.add_argument('--num_workers', default=0, type=int, help='data loader workers of every run')
    p.add_argument('--seed', default=0, type=int, help='seed of every run (subsets, heads, random init)')
    return p


def commands(args) -> dict:
    """protocol -> (script, argv) of the runs, the argv exactly as on a command line."""
    common = ['--num_workers', str(args.num_workers), '--seed', str(args.seed)]
    out = {name: ['--output_dir', os.path.join(args.output_dir, name)] for name in PROTOCOLS}
    probe = ['--checkpoint', args.checkpoint] + common
    warmup = str(min(10, args.linear_epochs // 9))  # MAE's 10 of 90
    finetune = ['--finetune', args.checkpoint] * (args.checkpoint != 'random')
    return {
        'knn': ('main_linprobe.py', ['--protocol', 'knn'] + probe + out['knn']),
        'linear': ('main_linprobe.py', ['--protocol', 'linear', '--epochs', str(args.linear_epochs),
                                        '--warmup_epochs', warmup] + probe + out['linear']),
        'logreg1': ('main_linprobe.py', ['--protocol', 'logreg', '--train_fraction', '0.01'] + probe + out['logreg1']),
        'logreg10': ('main_linprobe.py', ['--protocol', 'logreg', '--train_fraction', '0.1'] + probe + out['logreg10']),
        'finetune': ('main_finetune.py', finetune + ['--epochs', str(args.finetune_epochs), '--warmup_epochs',
                                                     str(args.finetune_warmup), '--blr', str(args.finetune_blr)]
                     + common + out['finetune']),
    }


def main(args):
    scripts = {'main_linprobe.py': main_linprobe, 'main_finetune.py': main_finetune}
    results = {}
    for name, (script, argv) in commands(args).items():
        if name not in args.protocols:
            continue
        print(f'[eval_all] {name}: python {script} {shlex.join(argv)}', flush=True)
        module = scripts[script]
        parser = argparse.ArgumentParser(script, parents=[module.get_args_parser()])
        results[name] = module.main(parser.parse_args(argv))
    shown = ', '.join(f'{name} {metrics["acc1"]:.1f}' for name, metrics in results.items())
    print(f'[eval_all] {args.checkpoint}: {shown}', flush=True)
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser('all evaluations of one backbone', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
