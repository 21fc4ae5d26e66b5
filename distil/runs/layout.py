"""Checkpoint layout, completeness and the `latest` pointer.

One layout for every run, local or Ray, in a folder or in S3: a run's checkpoints are
folders named after their step directly in the run's folder (Ray Train's layout, which a Ray
run writes through `ray.train.report(checkpoint_dir_name=...)`):

    RUN/step_00000100/
        mp_rank_00_model_states.pt            DeepSpeed: module, scheduler, loss scaler, client state
        *_optim_states.pt                     DeepSpeed: one ZeRO shard per rank
        rank_00000.pt                         per-rank RNG states
        trainer_state.json                    step, tokens, sampler position, world size
        config.yaml                           the resolved config of the run
        hf/                                   the student's HF config and the tokenizer
        metrics.jsonl                         the run's metrics up to this step
        COMPLETE                              written last, after every rank has saved: step,
                                              tokens, loss, time, and a manifest (size and
                                              sha256 of every other file, from every rank)
    RUN/latest                                a local run: name of the newest COMPLETE checkpoint
                                              (a Ray run's registry is Ray's own snapshot file)

A checkpoint without COMPLETE is never loaded: a run killed mid-save resumes from the one
before. `latest` is replaced atomically, and only after COMPLETE exists. The manifest lets a
copy of a checkpoint (in object storage, or pulled from it) be checked file by file: a Ray
run's checkpoint is assembled in storage from every rank's own folder, so rank 0 cannot
simply look at the files; each rank hashes the files it wrote and rank 0 gathers them.

Nothing is used before `damage()` finds it intact (resume, export, pull, re-sharding): every
file of the manifest present, a regular file (no symbolic link), of its size and sha256, and
trainer_state.json at COMPLETE's step. Resume takes the newest intact checkpoint and names
each damaged one it passes over (distil/runs/checkpointer.py `find_resume`). Pruning deletes COMPLETE first, so a
checkpoint cut short while it is deleted is incomplete, never "complete but partial".

Local runs of distil-run 0.1 kept their checkpoints in RUN/checkpoints/; `adopt_old_layout`
moves them into the run folder when such a run is trained again.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distil.errors import UserError
from distil.storage.integrity import describe, sha256_file, verify

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# step_00000100, or step_00000100.1 for a second save of that step: a Ray run that fell back
# from a damaged checkpoint trains that step again, and must not save into the folder Ray has
# registered (Ray deletes a registered checkpoint by its path when it prunes it).
_TAG = re.compile(r"^step_(\d{8})(?:\.([1-9]\d*))?$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|^rank_(\d+)\.pt$")


def is_tag(name: str) -> bool:
    return bool(_TAG.match(name))


def step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def tag_for(step: int, resave: int = 0) -> str:
    return f"step_{step:08d}" + (f".{resave}" if resave else "")


def tag_key(tag: str) -> tuple[int, int]:
    """Order of checkpoints: by step, then by re-save."""
    m = _TAG.match(tag)
    return int(m.group(1)), int(m.group(2) or 0)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / COMPLETE).is_file()


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d.name for d in root.iterdir() if _TAG.match(d.name) and is_complete(d)), key=tag_key)


def latest_tag(root: Path) -> str | None:
    """The checkpoint to resume from: `latest` if it points at a complete one, else the newest complete."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if _TAG.match(tag) and is_complete(root / tag):
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(ckpt_dir: Path, rank: int) -> None:
    torch.save({"rng": rng_state()}, ckpt_dir / f"rank_{rank:05d}.pt")


def load_rank_state(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint was written with fewer ranks."""
    path = ckpt_dir / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return False
    # weights_only: a checkpoint is data, never code to run; numpy's RNG state is an array.
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    with torch.serialization.safe_globals([multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
        set_rng_state(torch.load(path, weights_only=True)["rng"])
    return True


def _owner(relative: str) -> int:
    """The rank that wrote a file: its ZeRO shard and RNG state are its own, the rest is rank 0's."""
    m = _RANK_FILE.search(relative)
    return int(m.group(1) or m.group(2)) if m else 0


def rank_manifest(ckpt_dir: Path, rank: int) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files in ckpt_dir that `rank` wrote."""
    out = {}
    for f in sorted(ckpt_dir.rglob("*")):
        rel = f.relative_to(ckpt_dir).as_posix()
        if f.is_file() and rel != COMPLETE and _owner(rel) == rank:
            out[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def damage(ckpt_dir: Path, hashes: bool = True) -> str | None:
    """What makes a checkpoint unusable, in a sentence, or None when it is intact: COMPLETE
    readable with a manifest and the folder's step, every file as the manifest says, and
    trainer_state.json at COMPLETE's step. Never raises for a damaged file."""
    try:
        complete = json.loads((ckpt_dir / COMPLETE).read_text())
    except FileNotFoundError:
        return "no COMPLETE marker: the save did not finish"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "COMPLETE is not valid JSON"
    if not isinstance(complete, dict) or not isinstance(complete.get("files"), dict):
        return "COMPLETE has no file manifest"
    if _TAG.match(ckpt_dir.name) and complete.get("step") != step_of(ckpt_dir.name):
        return f"COMPLETE says step {complete.get('step')!r}, the folder is {ckpt_dir.name}"
    problems = verify(ckpt_dir, complete["files"], hashes=hashes)
    if problems:
        return describe(problems)
    if TRAINER_STATE in complete["files"]:
        try:
            state = json.loads((ckpt_dir / TRAINER_STATE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{TRAINER_STATE} is not valid JSON"
        if not isinstance(state, dict) or state.get("step") != complete.get("step"):
            return f"{TRAINER_STATE} says step {state.get('step') if isinstance(state, dict) else None!r}, COMPLETE {complete.get('step')!r}"
    return None


def unlisted_states(ckpt_dir: Path, manifest: dict[str, dict]) -> list[str]:
    """DeepSpeed state files in ckpt_dir that the manifest does not name (DeepSpeed globs for them)."""
    return sorted(f.name for f in ckpt_dir.glob("*_states.pt") if f.name not in manifest)


def drop_unlisted(ckpt_dir: Path, manifest: dict[str, dict]) -> list[str]:
    """Delete files the manifest does not name; returns them. They are leftovers of an earlier
    save of the same step that never completed (e.g. a preempted run's upload, maybe by another
    worker count): DeepSpeed finds shards by globbing, so a stale one must not stay beside the rest."""
    stale = [
        f
        for f in ckpt_dir.rglob("*")
        if f.is_file() and f.relative_to(ckpt_dir).as_posix() not in manifest and f.name != COMPLETE
    ]
    for f in stale:
        f.unlink(missing_ok=True)  # ranks sharing a disk (torchrun) all do this
    return sorted(f.relative_to(ckpt_dir).as_posix() for f in stale)


def clear_for_save(ckpt_dir: Path) -> None:
    """Before saving into ckpt_dir: remove what an earlier save of that step left, unfinished,
    or complete but damaged (a run that fell back to an older checkpoint saves that step again)."""
    if ckpt_dir.is_dir():
        prune(ckpt_dir.parent, ckpt_dir.name)


def read_complete(ckpt_dir: Path) -> dict:
    """COMPLETE of a checkpoint that `damage()` found intact."""
    return json.loads((ckpt_dir / COMPLETE).read_text())


def prune(root: Path, tag: str) -> None:
    """Delete a checkpoint, COMPLETE first: cut short, it is an incomplete one, never used."""
    (root / tag / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(root / tag, ignore_errors=True)


def finalize(
    root: Path,
    tag: str,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    manifest: dict[str, dict],
    summary: dict,
) -> None:
    """Rank 0, after every rank saved and sent its part of the manifest: state, config,
    COMPLETE (summary + manifest), then `latest`, then pruning."""
    ckpt = root / tag
    _atomic_write(ckpt / TRAINER_STATE, json.dumps(trainer_state, indent=2))
    _atomic_write(ckpt / "config.yaml", config_yaml)
    manifest = {**manifest, **rank_manifest(ckpt, 0)}  # now with the files written just above
    complete = {
        "step": trainer_state["step"],
        "world_size": trainer_state["world_size"],
        "tokens": trainer_state["tokens"],
        "planned_steps": trainer_state.get("planned_steps"),
        **summary,
        "files": manifest,
    }
    _atomic_write(ckpt / COMPLETE, json.dumps(complete, indent=1))
    _atomic_write(root / LATEST, tag)
    for old in complete_tags(root)[:-keep_last]:
        prune(root, old)
    # Leftovers of saves that never completed, older than the newest complete one.
    for d in root.iterdir():
        if _TAG.match(d.name) and not is_complete(d) and tag_key(d.name) < tag_key(tag):
            shutil.rmtree(d, ignore_errors=True)


OLD_FOLDER = "checkpoints"  # where distil-run 0.1's local runs kept their checkpoints


def adopt_old_layout(run_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    """Move the checkpoints of a run written in the 0.1 layout (RUN/checkpoints/step_N, and its
    `latest`) into the run folder; returns the folders moved. Every process of a run may call
    it at once (torchrun ranks on one disk): each move is one rename, and a checkpoint another
    process moved meanwhile is simply found moved."""
    old = run_dir / OLD_FOLDER
    if not old.is_dir() or old.is_symlink():
        return []
    moved = []
    for d in sorted(old.iterdir(), key=lambda d: d.name):
        if not (_TAG.match(d.name) and d.is_dir()) or d.is_symlink():
            continue
        if (run_dir / d.name).exists():
            raise UserError(
                f"{d} and {run_dir / d.name} both exist: the run holds one checkpoint twice",
                where="checkpoint",
                fix=f"keep one of them (the newer layout is {run_dir / d.name}), delete the other, and run again",
            )
        try:
            os.replace(d, run_dir / d.name)
        except FileNotFoundError:  # moved by another rank just now
            continue
        moved.append(d.name)
    if (old / LATEST).is_file() and not (old / LATEST).is_symlink():
        try:
            os.replace(old / LATEST, run_dir / LATEST)
        except FileNotFoundError:
            pass
    with_other_files = any(True for _ in old.iterdir()) if old.is_dir() else False
    if not with_other_files:
        try:
            old.rmdir()
        except OSError:  # another rank removed it, or something was put there meanwhile
            pass
    if moved:
        log(
            f"{run_dir}: {len(moved)} checkpoint(s) moved from {OLD_FOLDER}/ into the run folder (the layout every run uses now)"
        )
    return moved


def read_trainer_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / TRAINER_STATE).read_text())
