"""Submit main_pretrain.py, main_finetune.py or main_linprobe.py to SLURM through submitit, as MAE's
submitit_pretrain.py and DINO's run_with_submitit.py do. A preempted or timed-out job is requeued
with the same command and resumes from its output_dir/checkpoint-last.pth.

The launcher's flags come first, then the script and its own flags, as with torchrun:
    python submitit_launch.py --nodes 2 --ngpus 8 --partition learnfair --timeout 4320 \\
        --job_dir /checkpoint/$USER/mimco_vits main_pretrain.py --method mimco --teacher t.pth ...
Without SLURM (--cluster local) the tasks run on this machine; that is how the tests run it.
"""

import argparse
import os
import re
import sys

import main_finetune
import main_linprobe
import main_pretrain
from util import checkpoint
from util.dist import job_port
from util.errors import InputError, run_main

ROOT = os.path.dirname(os.path.abspath(__file__))
# What the launcher uses of a script: its command line and its main(args), nothing else.
PARSERS = {
    'main_pretrain.py': main_pretrain.get_args_parser,
    'main_finetune.py': main_finetune.get_args_parser,
    'main_linprobe.py': main_linprobe.get_args_parser,
}
MAINS = {
    'main_pretrain.py': main_pretrain.main,
    'main_finetune.py': main_finetune.main,
    'main_linprobe.py': main_linprobe.main,
}
SUBMITIT = 'submitit==1.5.4'  # as in requirements.txt


def get_args_parser():
    p = argparse.ArgumentParser('mimco SLURM launcher', add_help=False)
    # Resources of the job
    p.add_argument('--nodes', default=1, type=int, help='nodes to request')
    p.add_argument(
        '--ngpus',
        default=8,
        type=int,
        help='GPUs per node, one task (process) each; with the script flag --device cpu, '
        'CPU processes per node',
    )
    p.add_argument('--cpus_per_task', default=10, type=int, help='CPU cores per task (loaders)')
    p.add_argument(
        '--mem_gb',
        default=None,
        type=float,
        help="memory per node in GB (default: the partition's)",
    )
    p.add_argument(
        '--timeout',
        default=4320,
        type=int,
        help='time limit of one run of the job in minutes (72 h); a run that reaches it is '
        'requeued',
    )
    # Scheduler
    p.add_argument('--partition', default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument(
        '--slurm',
        default=[],
        action='append',
        metavar='KEY=VALUE',
        help="another setting of submitit's SLURM executor, e.g. account=abc, qos=high, "
        'constraint=volta32gb (repeat the flag for several)',
    )
    p.add_argument(
        '--max_num_timeout',
        default=30,
        type=int,
        help='requeues after reaching --timeout before the job gives up (preemptions do not count)',
    )
    p.add_argument(
        '--job_dir',
        default='output/submitit/%j',
        help="folder of the job's logs and, unless the script is given --output_dir, of its "
        'output (%%j: the job id)',
    )
    p.add_argument('--name', default=None, help='job name (default: mimco- and the script name)')
    p.add_argument(
        '--cluster',
        default=None,
        choices=['slurm', 'local'],
        help='slurm, or local: the tasks run on this machine (default: slurm where srun is found)',
    )
    p.add_argument(
        '--wait',
        action='store_true',
        help='stay until the job ends, requeues included; exit 1 if it failed',
    )
    p.add_argument('script', help='main_pretrain.py, main_finetune.py or main_linprobe.py')
    p.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's own flags")
    return p


def import_submitit():
    """submitit, which only the launcher needs; without it one line names the pip command."""
    try:
        import submitit
    except ImportError:
        raise InputError(
            f'submitit is not installed, which submitit_launch.py needs: pip install {SUBMITIT}'
        ) from None
    return submitit


def parse_script_args(script: str, argv: list):
    """The script's flags as its own parser reads them, except that --output_dir and --device stay
    None when not given (the launcher fills in the first; the second is the compute node's)."""
    parser = argparse.ArgumentParser(script, parents=[PARSERS[script]()])
    parser.set_defaults(output_dir=None, device=None)
    return parser.parse_args(argv)


def check_output_dir(script: str, output_dir: str, args) -> None:
    """Refuse, before the job waits in the queue, an --output_dir whose checkpoint-last.pth belongs
    to another run: the check the script makes when it starts (checkpoint.check_same_run). A flag
    left unset here (None) gets its value as the run starts and is checked only then."""
    path = os.path.join(output_dir, 'checkpoint-last.pth')
    if args.resume or '%j' in output_dir or not os.path.isfile(path):
        return
    given = {flag: value for flag, value in vars(args).items() if value is not None}
    saved = checkpoint.load_file(path)
    flags = checkpoint.SCRIPT_SAME_RUN[script]
    checkpoint.check_same_run(path, saved, argparse.Namespace(**given), flags)


def torchrun_environment(job_env) -> dict:
    """torchrun's variables for this task, from submitit's JobEnvironment (a SLURM task or one of
    the local executor's): util.dist then starts as under torchrun. The rendezvous is the job's
    first host at a port derived from the job id, which a requeued run keeps."""
    port = os.environ.get('MASTER_PORT') or job_port(job_env.job_id)
    return {
        'RANK': str(job_env.global_rank),
        'WORLD_SIZE': str(job_env.num_tasks),
        'LOCAL_RANK': str(job_env.local_rank),
        'MASTER_ADDR': job_env.hostnames[0],
        'MASTER_PORT': str(port),
    }


class Job:
    """`python SCRIPT ARGV` in every task of a submitit job: submitit calls it in each task, and
    calls checkpoint() in the first task when SLURM preempts the job or its time runs out."""

    def __init__(self, script: str, argv: list):
        self.script = script
        # Never written to: main(args) fills in --lr, --amp, --start_epoch ... on its own parse,
        # so a requeued run starts from the flags of the run that wrote the checkpoint and passes
        # the implicit resume's same-run check.
        self.argv = list(argv)

    def __call__(self) -> None:
        job_env = import_submitit().JobEnvironment()
        os.environ.update(torchrun_environment(job_env))
        parser = argparse.ArgumentParser(self.script, parents=[PARSERS[self.script]()])
        args = parser.parse_args(self.argv)  # on the compute node: its defaults (--device)
        args.output_dir = args.output_dir.replace('%j', job_env.job_id)
        if args.log_dir:
            args.log_dir = args.log_dir.replace('%j', job_env.job_id)
        run_main(MAINS[self.script], args)

    def checkpoint(self):
        """submitit's hook on preemption or time-out: the job is requeued with what this returns,
        the same command, which resumes from output_dir/checkpoint-last.pth (the script rewrites
        it at the end of every epoch; the epoch under way is run again)."""
        return import_submitit().helpers.DelayedSubmission(Job(self.script, self.argv))


def slurm_settings(pairs: list) -> dict:
    """--slurm KEY=VALUE pairs as submitit's slurm_KEY parameters."""
    settings = {}
    for pair in pairs:
        if '=' not in pair:
            raise InputError(f'--slurm {pair}: give KEY=VALUE, e.g. --slurm account=abc')
        key = pair.split('=', 1)[0]
        settings[f'slurm_{key}'] = pair.split('=', 1)[1]
    return settings


def build_executor(submitit, args, gpus_per_node: int):
    """submitit's executor for SLURM (or this machine, --cluster local) with the job's resources."""
    executor = submitit.AutoExecutor(
        folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_num_timeout
    )
    name = args.name or f'mimco-{args.script[:-3]}'
    try:
        executor.update_parameters(
            name=name,
            nodes=args.nodes,
            tasks_per_node=args.ngpus,  # one task per GPU
            gpus_per_node=gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            mem_gb=args.mem_gb,
            timeout_min=args.timeout,
            slurm_partition=args.partition,
            slurm_signal_delay_s=120,  # USR2 two minutes before the time limit: time to requeue
            **slurm_settings(args.slurm),
        )
    except NameError as e:  # an unknown --slurm KEY: submitit lists the valid ones
        raise InputError(f'--slurm: {str(e).splitlines()[0]}') from None
    except ValueError as e:  # e.g. the local executor and --nodes 2
        raise InputError(f'{e} (--cluster {executor.cluster}): use --nodes 1') from None
    return executor


def wait_for(job, job_dir: str) -> None:
    """Block until the job ends, requeues included; a failed job: its error line, exit status 1."""
    error = job.exception()
    if error is None:
        print(f'job {job.job_id} finished')
        return
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if re.match(r'(error: |\w+(Error|Exception): )', line)]
    reasons.append(lines[-1])
    reason = reasons[0].removeprefix('error: ')
    sys.stderr.write(f'error: job {job.job_id} failed ({reason}): its logs are in {job_dir}\n')
    sys.exit(1)


def main(args):
    if args.script not in PARSERS:
        raise InputError(
            f'unknown script {args.script}: submitit_launch.py runs main_pretrain.py, '
            f'main_finetune.py or main_linprobe.py'
        )
    submitit = import_submitit()
    args.job_dir = os.path.abspath(args.job_dir)
    script_args = parse_script_args(args.script, args.script_args)
    argv = list(args.script_args)
    output_dir = script_args.output_dir
    if output_dir is None:  # the job folder, as MAE's submitit_pretrain.py
        output_dir = args.job_dir
        argv += ['--output_dir', output_dir]
    check_output_dir(args.script, output_dir, script_args)
    gpus_per_node = args.ngpus
    if (script_args.device or '').startswith('cpu'):
        gpus_per_node = 0
    executor = build_executor(submitit, args, gpus_per_node)
    # The tasks unpickle Job, which imports this checkout's modules, wherever they start: the
    # local executor and sbatch pass the environment on.
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
    job = executor.submit(Job(args.script, argv))
    job_dir = args.job_dir.replace('%j', str(job.job_id))
    print(
        f'submitted job {job.job_id}: {args.script}, {args.nodes} x {args.ngpus} tasks, '
        f'logs in {job_dir}'
    )
    if args.wait:
        wait_for(job, job_dir)
    return job


if __name__ == '__main__':
    parser = argparse.ArgumentParser('mimco SLURM launcher', parents=[get_args_parser()])
    run_main(main, parser.parse_args())
