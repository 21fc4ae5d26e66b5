"""A run is one run: what may change when it is resumed, and what may not.

A run name stands for one distillation. Resuming it with another student, another learning
rate or other data would mix two experiments in one set of weights, so the resolved config
is compared with the one saved in the checkpoint: the keys in `RESUMABLE` may differ (and are
logged), any other difference is refused with the diff and the fix. `resume: false` over a
run that has checkpoints is refused too, unless the user asks to start over, which moves the
old run aside (`RUN.replaced-<UTC time>`) instead of mixing the two.
"""

from __future__ import annotations

# Imports inside functions: the checkpoint layout and catalog (torch) only when checkpoints are
# read, not when a config is checked.
import time
from dataclasses import dataclass
from typing import Any

import yaml

from distil.config.schema import RESUMABLE, DistilConfig
from distil.errors import UserError


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 5e-4, ...}; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resumable(key: str) -> bool:
    return any(key == r or key.startswith(f"{r}.") for r in RESUMABLE)


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences between two resolved configs, as 'key: old -> new'."""
    a, b = flatten(saved), flatten(new)
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
            (allowed if resumable(key) else refused).append(line)
    return allowed, refused


def check_continuation(cfg: DistilConfig, saved_yaml: str, where: str) -> list[str]:
    """Refuse (UserError) a resume whose config differs from the checkpoint's in a key that
    defines the run; returns the allowed differences, to be logged."""
    try:
        saved = DistilConfig.model_validate(yaml.safe_load(saved_yaml)).model_dump(mode="json")
    except Exception:  # an older or foreign config.yaml: compare what it says, as it says it
        saved = yaml.safe_load(saved_yaml) or {}
    allowed, refused = config_changes(saved, cfg.model_dump(mode="json"))
    if refused:
        shown = "\n    ".join(refused[:20]) + ("\n    ..." if len(refused) > 20 else "")
        raise UserError(
            f"run {cfg.run_name()} was started with another config ({where}):\n    {shown}",
            where="run.name",
            fix="to start a new run, set a new run.name; to continue this one, set those keys back. "
            f"Only these may change on a resume: {', '.join(RESUMABLE)}",
        )
    return allowed


def finished_message(cfg: DistilConfig, step: int, where: str, planned: int | None = None) -> str | None:
    """The message for a run that has nothing left to do, or None. `planned`: the steps its time
    budget planned (COMPLETE's planned_steps), if it has one."""
    end = min(planned, cfg.train.max_steps) if planned is not None else cfg.train.max_steps
    if step < end:
        return None
    if planned is not None and planned < cfg.train.max_steps:
        return (
            f"run {cfg.run_name()} is already finished: its checkpoint {where} is at step {step}, the "
            f"{planned:,} steps its time budget (train.time_budget_minutes) planned. Nothing was trained or changed. "
            "For a new run (e.g. with a longer budget), set a new run.name."
        )
    return (
        f"run {cfg.run_name()} is already finished: its checkpoint {where} is at step {step} and train.max_steps "
        f"is {cfg.train.max_steps}. Nothing was trained or changed. To train further, raise train.max_steps; "
        "for a new run, set a new run.name."
    )


def refuse_fresh_start(cfg: DistilConfig, newest: str, where: str) -> None:
    raise UserError(
        f"checkpoint.resume is false but run {cfg.run_name()} already has checkpoints (newest: {newest}) in {where}",
        where="checkpoint.resume",
        fix="set a new run.name, resume it (checkpoint.resume: true), or pass --start-over to move "
        "the old run aside and start again",
    )


def replaced_name(run_name: str) -> str:
    """Where a run that is started over is moved: beside it, never deleted."""
    return f"{run_name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def start_over(cfg: DistilConfig, log) -> None:
    """--start-over: move the run's folder (checkpoints, metrics, model) aside, whole."""
    storage, name = cfg.storage_root(), cfg.run_name()
    if not _run_exists(cfg):
        return
    dest = replaced_name(name)
    storage.move(name, dest)
    log(f"--start-over: the previous run {name} was moved to {cfg.storage.uri.rstrip('/')}/{dest}")


def _run_exists(cfg: DistilConfig) -> bool:
    run = cfg.run_storage()
    return run.local().exists() if not run.is_s3 else bool(run.list_keys())


@dataclass
class Preview:
    """What storage says of a run before anything of it changes (`check`)."""

    newest: str | None  # its newest complete checkpoint (sizes checked); None: it starts at step 0
    finished: str | None  # the message when it has nothing left to do; None: it trains


def check(cfg: DistilConfig, log) -> Preview:
    """Whether this config continues the run in storage (a folder or S3), before any process
    trains, for a local run and a Ray run alike: `checkpoint.resume: false` over checkpoints is
    refused, so is a config that differs from the newest complete checkpoint's in a key that
    defines the run (the allowed differences are logged), and a run at its last step is finished.

    A preview from the catalog's listing (every file present at its size): which checkpoint is
    resumed, verified file by file, is decided where it is loaded (distil/runs/checkpointer.py
    `find_resume`). Only a checkpoint that would make the run "finished" is hashed here (read
    through, on S3): a damaged last checkpoint means the run still has steps to train."""
    from distil.runs.catalog import list_checkpoints, verify_checkpoint
    from distil.runs.layout import adopt_old_layout

    run = cfg.run_storage()
    if not run.is_s3:
        adopt_old_layout(run.local(), log)  # a run written by distil-run 0.1
    if not _run_exists(cfg):
        return Preview(None, None)
    complete = [c for c in list_checkpoints(run) if c.complete]
    if not complete:
        return Preview(None, None)
    newest = complete[-1]
    where = f"{run.uri}/{newest.prefix}"
    if not cfg.checkpoint.resume:
        refuse_fresh_start(cfg, newest.tag, run.uri)
    if "config.yaml" in newest.objects:
        saved = run.read_bytes(newest.objects["config.yaml"]["key"]).decode("utf-8", "replace")
        try:
            allowed = check_continuation(cfg, saved, where)
        except yaml.YAMLError:  # damaged: the checkpoint that is loaded is hashed, its config compared, then
            allowed = []
        if allowed:
            log("resuming with changed settings: " + "; ".join(allowed))
    finished = finished_message(cfg, newest.step, where, (newest.meta or {}).get("planned_steps"))
    if finished is not None:
        problem = verify_checkpoint(run, newest)
        if problem is not None:
            log(f"warning: checkpoint {where} is damaged ({problem}); the run trains again from an older one")
            finished = None
    return Preview(newest.tag, finished)
