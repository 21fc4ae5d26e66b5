"""Keep the console for our own progress: libraries speak at warning level and above, and
never on the stdout of a command whose output is data.

A module of its own (not in `cli`) so that the launcher, the benchmark and `pull` can call it
without importing the command line, which imports them: the import graph stays acyclic."""

from __future__ import annotations

# Imports inside functions: the libraries it quiets, when it is called.
import contextlib
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/distil/torch_extensions"))
    # `datasets` is imported only where a hub data set is read: it reads these when it is.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a torch.distributed function torch has renamed: two lines a rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@contextlib.contextmanager
def result_only_on_stdout():
    """While a command works, whatever libraries write to stdout (DeepSpeed prints its log lines,
    some at the C level) goes to stderr: stdout carries the command's result alone, e.g. the JSON
    that a script parses."""
    out = sys.stdout
    out.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        out.flush()  # what a library wrote through the original object goes to stderr too
        sys.stdout = out
        os.dup2(saved, 1)
        os.close(saved)
