"""Bad input from the user: one line that names the problem and the fix, no traceback."""

import sys

import torch

from util.dist import is_dist_avail_and_initialized


class InputError(ValueError):
    """Raised for a wrong flag, file or data folder; the message says how to fix it."""


def one_line(error: Exception) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback."""
    text = str(error).strip()
    # A worker's error reaches the main process re-raised with its traceback in the message; the
    # message proper follows the last `<its type>: `.
    marker = f'{type(error).__name__}: '
    if 'Original Traceback' in text and marker in text:
        text = text[text.rindex(marker) + len(marker) :]
    return ' '.join(text.split())


def run_main(main, args) -> None:
    """Run a script's `main(args)`, turning an InputError into `error: ...` and exit status 2. The
    process group goes down with it, on success or error: left to the interpreter's exit, gloo's
    threads may still run and abort the process ("terminate called without an active exception")."""
    try:
        main(args)
    except InputError as e:
        sys.stderr.write(f'error: {one_line(e)}\n')
        sys.exit(2)
    except FloatingPointError as e:  # a non-finite loss: the message holds step, terms and lr
        sys.stderr.write(f'error: {e}\n')
        sys.exit(1)
    finally:
        if is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
