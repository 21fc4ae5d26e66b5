"""Resuming on another worker count: ZeRO-2 optimizer state re-partitioned.

A ZeRO-2 checkpoint holds one shard per rank: a flat slice of the fp32 master weights and of
Adam's moments, cut for the world size that wrote it. Spot capacity often comes back smaller
or larger, so a run must be able to continue on N' workers from a checkpoint written by N.
DeepSpeed's universal checkpoint format is the tool for this: `ds_to_universal` merges the
shards into one folder per parameter (fp32, exp_avg, exp_avg_sq, step), and an engine started
with `checkpoint.load_universal` slices each rank's new partition out of it. The conversion is
a transient local folder, made on resume and deleted once loaded; what stays in storage is
the ordinary ZeRO checkpoint.

The data side needs nothing: the sampler's order is global (see `ResumableSampler`) and the
global batch size is fixed, so a step on N' workers trains the same samples as on N.
"""

from __future__ import annotations

# Imports inside functions: DeepSpeed's checkpoint conversion only when the worker count changed.
import argparse
import contextlib
import io
import shutil
from pathlib import Path


def universal_info() -> dict:
    """Client state saved in every checkpoint's model states, so that DeepSpeed's own
    `ds_to_universal` script converts our checkpoints without `--inject_missing_state`."""
    from deepspeed.checkpoint import constants as c  # deepspeed is imported only where it runs

    return {c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def to_universal(ckpt_dir: Path, out_root: Path) -> Path:
    """Convert the ZeRO checkpoint in ckpt_dir into DeepSpeed's universal layout at
    out_root/<ckpt_dir.name>; returns out_root, the `load_dir` for `engine.load_checkpoint`.

    Each rank converts its own copy: a Ray worker holds the whole checkpoint in a folder of its
    own, and nothing says two workers share a disk."""
    from deepspeed.checkpoint import ds_to_universal

    out = out_root / ckpt_dir.name
    shutil.rmtree(out_root, ignore_errors=True)  # a conversion cut short last time
    out_root.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir),
        output_folder=str(out),
        # one process: Ray workers and tests should not fork pools
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )  # checkpoints from before UNIVERSAL_INFO was saved
    chatter = io.StringIO()  # the script prints its progress; every rank would repeat it
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        try:
            ds_to_universal.main(args)
        except Exception as e:
            raise RuntimeError(
                f"converting {ckpt_dir} to a universal checkpoint failed: {e}\n{chatter.getvalue()[-2000:]}"
            ) from e
    return out_root
