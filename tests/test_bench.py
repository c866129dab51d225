"""The benchmarks run end to end on CPU, and the CUDA-first flags (--amp bf16, --compile) fall back
cleanly there. No timing is asserted: that is the benchmarks' job, on an idle machine."""

import functools
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
from tests.conftest import ROOT, epoch_losses, parse

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench_data  # noqa: E402
import bench_step  # noqa: E402

GPU_ALL = os.path.join(ROOT, 'benchmarks', 'gpu_all.sh')

# Heads and decoder as scripts/demo.sh sizes them for digits, so that a step takes milliseconds.
SMALL = (
    '--moco_mlp_dim 256 --head_dim 256 '
    '--decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4'
)
TINY_BENCH = '--steps 2 --warmup 1 --batch_size 8 --threads 1'.split() + ['--pretrain_args', SMALL]


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile without Inductor's C++ build (minutes per model on 2 CPU cores): Dynamo traces
    the real graphs and AOTAutograd their forward and backward, where the errors that only --compile
    meets show up (graph breaks, wiring, the frozen teacher's no-grad region: a MimCo teacher under
    inference_mode failed there in bf16, on CUDA and on CPU alike)."""
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))


def table_rows(text: str) -> dict:
    """{first cell: cells} of the Markdown table rows in `text`, header and rule left out."""
    lines = [line for line in text.splitlines() if line.startswith('| ')][1:]
    return {
        cells[0]: cells
        for cells in ([c.strip() for c in line.strip('|').split('|')] for line in lines)
    }


def number(cell: str) -> float:
    return float(cell.split()[0].replace(',', ''))  # '1,234 ok' -> 1234


def check_step_rows(rows: dict, methods: list) -> None:
    for method in methods:
        cells = dict(zip(bench_step.HEADER, rows[method]))
        assert cells['batch'] == '8'
        for name in ('step ms', 'img/s', 'reference ms', 'time ratio'):
            assert number(cells[name]) > 0, (method, name, cells[name])
        assert number(cells['img/s']) == pytest.approx(
            8000 / number(cells['step ms']), rel=0.02, abs=0.6
        )
        # Peak memory is CUDA's max_memory_allocated: n/a on the CPU, and so is the memory ratio.
        assert cells['peak MiB'] == cells['reference MiB'] == cells['mem ratio'] == 'n/a', cells


def run_bench(module, argv: list, capsys) -> str:
    parser = module.get_args_parser()
    module.main(parser.parse_args(argv))
    return capsys.readouterr().out


def test_bench_step_measures_every_method_on_cpu(one_thread, capsys):
    out = run_bench(bench_step, TINY_BENCH + ['--device', 'cpu'], capsys)
    assert out.startswith('device: ') and 'amp none' in out
    rows = table_rows(out)
    check_step_rows(rows, list(bench_step.METHODS))
    assert 'mimco: teacher fwd / step' in rows and 'mae / full-sequence ViT' in rows
    share = number(dict(zip(bench_step.HEADER, rows['mimco: teacher fwd / step']))['time ratio'])
    assert 0 < share < 1  # the teacher's forward is a part of the MimCo step


def test_bench_step_bf16_compile_on_cpu(one_thread, aot_eager_compile, capsys):
    out = run_bench(
        bench_step,
        TINY_BENCH
        + '--device cpu --methods mimco --amp bf16 --compile'.split()
        + ['--pretrain_args', SMALL],
        capsys,
    )
    assert 'amp bf16; compile True; ' in out
    check_step_rows(table_rows(out), ['mimco'])


def test_compiled_mocov3_compiles_once(one_thread, aot_eager_compile, monkeypatch, capsys):
    """MoCo v3's momentum changes every step: passed to the compiled model as a float, it made
    Dynamo recompile the whole model with a symbolic float (179 s of warm-up instead of 8 here, and
    the likely reason the compiled GPU benchmark did not finish in 250 s). The loop now updates the
    momentum encoder outside the model's graph."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)
    out = run_bench(
        bench_step,
        TINY_BENCH
        + '--device cpu --methods mocov3 --compile --no_reference --warmup 1 --steps 3'.split(),
        capsys,
    )
    cells = dict(zip(bench_step.HEADER, table_rows(out)['mocov3']))
    assert (
        number(cells['img/s']) > 0
        and cells['reference ms'] == 'n/a'
        and cells['time ratio'] == 'n/a'
    ), cells


def test_bench_step_prints_each_row_once_measured(one_thread, monkeypatch, capsys):
    """A benchmark stopped part-way (a timeout on a lent GPU) keeps the rows it measured."""
    measure_ours = bench_step.measure_ours

    def stop_at_mae(args, *rest):
        if args.method == 'mae':
            raise KeyboardInterrupt
        return measure_ours(args, *rest)

    monkeypatch.setattr(bench_step, 'measure_ours', stop_at_mae)
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench_step, TINY_BENCH + ['--device', 'cpu', '--methods', 'mimco,mae'], capsys)
    rows = table_rows(capsys.readouterr().out)
    check_step_rows(rows, ['mimco'])
    assert 'mimco: teacher fwd / step' in rows and 'mae' not in rows
    assert number(dict(zip(bench_step.HEADER, rows['mimco']))['warm-up s']) > 0


def test_bench_data_decoder_table_on_its_own_jpegs(one_thread, capsys):
    """Each decode path is timed on the JPEGs the benchmark writes, its views compared with the pil
    path's on the same crops; the GPU row is skipped with the reason where there is no CUDA."""
    out = run_bench(
        bench_data,
        ['--images', '6', '--repeats', '2', '--image_size', '64', '48', '--input_size', '32'],
        capsys,
    )
    assert out.startswith('6 JPEGs (64x48, quality 90); views 32 px')
    rows = table_rows(out)
    pil = next(cells for name, cells in rows.items() if name.startswith('pil (Pillow'))
    torchvision = rows['torchvision.io.decode_jpeg: decode + crop + flip']
    assert number(pil[1]) > 0 and pil[3] == '0.00 / 0' and pil[2].endswith('(2 runs)')
    mean, largest = (float(x) for x in torchvision[3].split(' / '))
    assert number(torchvision[1]) > 0 and mean < 0.5 and largest <= 16, (
        torchvision
    )  # torch's bicubic, not PIL's
    assert number(rows['nvjpeg path, worker part: read + header + crop box'][1]) > 0
    for _name, cells in rows.items():  # measured, or skipped with a reason
        assert cells[1] or cells[4].startswith('skipped: '), cells
    if not torch.cuda.is_available():
        assert rows['nvjpeg (GPU)'][4] == 'skipped: no CUDA device'


def test_bench_data_loader_table_runs_the_real_loader(one_thread, capsys):
    """--table loader: util.decode's training loader over the written JPEGs; nvjpeg falls back to
    the CPU (torchvision) where there is no CUDA, and the row says so."""
    backend = 'nvjpeg'
    out = run_bench(
        bench_data,
        [
            '--table',
            'loader',
            '--images',
            '16',
            '--image_size',
            '64',
            '48',
            '--input_size',
            '32',
            '--model',
            'vit_digits_patch4_16',
            '--batch_size',
            '4',
            '--batches',
            '2',
            '--num_workers',
            '0',
            '--data_backend',
            backend,
        ],
        capsys,
    )
    rows = table_rows(out)
    for method in ('mimco', 'mae'):
        assert rows[method][1] == (backend if torch.cuda.is_available() else 'torchvision'), rows[
            method
        ]
        assert rows[method][2] == '16' and float(rows[method][7]) > 0, rows[method]


def gpu_all(**env) -> tuple:
    """benchmarks/gpu_all.sh's completed process,
    and (title, flags, printed text, closing line) of each block."""
    run = subprocess.run(
        ['bash', GPU_ALL],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, 'PYTHON': sys.executable, **env},
    )
    blocks = re.findall(
        r'^## ([^\n(]*) \(([^\n]*)\), budget \d+ s\n(.*?)^-- ([^\n]*)$',
        run.stdout,
        flags=re.M | re.S,
    )
    return run, blocks


def script_titles() -> list:
    return re.findall(r"^block \d+ '([^']+)'", open(GPU_ALL).read(), flags=re.M)


def fake_python(tmp_path, body: str) -> str:
    path = tmp_path / 'python'
    path.write_text(f'#!/bin/sh\n{body}\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_gpu_all_runs_every_block_tiny_on_cpu():
    """The GPU session's one command,
    every block on the CPU with a tiny ViT (TINY=1): each prints its rows."""
    run, blocks = gpu_all(TINY='1')
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert [title for title, *_ in blocks] == script_titles() and len(blocks) == 8, blocks
    assert all(re.fullmatch(r'\d+ s', end) for *_, end in blocks), (
        blocks
    )  # none failed, stopped or skipped
    tables = [table_rows(text) for _, _, text, _ in blocks]
    assert tables[0]['torchvision.io.decode_jpeg: decode + crop + flip'][1] and 'mimco' in tables[1]
    for table, (_, flags, _, _) in zip(tables[2:], blocks[2:]):
        methods = re.search(r'--methods (\S+)', flags).group(1).split(',')
        assert all(number(table[m][4]) > 0 for m in methods), table
    assert (
        'mae / full-sequence ViT' in tables[6] and number(tables[7]['mocov3'][7]) > 0
    )  # the reference
    assert re.search(r'^total \d+ s$', run.stdout, flags=re.M)


def test_gpu_all_reports_a_failed_block_and_runs_the_next(tmp_path):
    run, blocks = gpu_all(PYTHON=fake_python(tmp_path, 'exit 3'))
    assert run.returncode == 1 and len(blocks) == len(script_titles()) == 8, run.stdout
    assert all(re.fullmatch(r'\d+ s: failed \(exit code 3\)', end) for *_, end in blocks), blocks


def test_gpu_all_stops_a_block_at_its_budget(tmp_path):
    """A block past its budget is stopped (the rows it printed stay); none starts after TOTAL_S."""
    endless = fake_python(tmp_path, "echo '| row | measured |'\nexec sleep 60")
    run, blocks = gpu_all(PYTHON=endless, TOTAL_S='1')
    assert run.returncode == 1 and len(blocks) == 8, run.stdout
    seconds, why = blocks[0][3].split(' s: ', 1)
    assert why == 'stopped at its budget of 1 s' and 1 <= int(seconds) <= 11, blocks[
        0
    ]  # SIGKILL 10 s after
    assert '| row | measured |' in blocks[0][2]
    assert all(end == '0 s: skipped: out of time' for *_, end in blocks[1:]), blocks


def test_pretrain_bf16_and_compile_fall_back_on_cpu(one_thread, aot_eager_compile, tmp_path):
    """main() with the GPU defaults forced on a CPU: bf16 autocast and torch.compile run and train.

    A 32-image ImageFolder keeps the epoch to 2 steps: bf16 matmuls are emulated, slowly, on CPUs
    without AVX512-BF16/AMX."""
    for i in range(32):
        folder = tmp_path / 'data' / 'train' / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        ).save(folder / f'{i}.png')
    out = str(tmp_path / 'mae')
    args = parse(
        [
            '--method',
            'mae',
            '--device',
            'cpu',
            '--amp',
            'bf16',
            '--compile',
            '--epochs',
            '1',
            '--batch_size',
            '16',
            '--num_workers',
            '0',
            '--warmup_epochs',
            '0',
            '--data_path',
            str(tmp_path / 'data'),
            '--output_dir',
            out,
        ]
        + shlex.split(SMALL)
    )
    main_pretrain.main(args)
    assert args.amp == 'bf16'
    [loss] = epoch_losses(out)
    assert math.isfinite(loss) and 0 < loss < 10, loss  # a normalised-pixel MSE, not bf16 garbage
    assert os.path.isfile(os.path.join(out, 'checkpoint-last.pth'))
