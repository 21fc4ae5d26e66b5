"""Checkpoint layout, completeness and the `latest` pointer.

    RUN/checkpoints/step_00000100/
        mp_rank_00_model_states.pt            DeepSpeed: module, scheduler, loss scaler, client state
        *_optim_states.pt                     DeepSpeed: one ZeRO shard per rank
        rank_00000.pt                         per-rank RNG states
        trainer_state.json                    step, tokens, sampler position, world size
        config.yaml                           the resolved config of the run
        COMPLETE                              written last, after every rank has saved
    RUN/checkpoints/latest                    name of the newest COMPLETE checkpoint

A checkpoint without COMPLETE is never loaded: a run killed mid-save resumes from the one
before. `latest` is replaced atomically, and only after COMPLETE exists.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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
    return sorted(d.name for d in root.iterdir() if _TAG.match(d.name) and is_complete(d))


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
    set_rng_state(torch.load(path, weights_only=False)["rng"])
    return True


def finalize(root: Path, tag: str, trainer_state: dict, config_yaml: str, keep_last: int) -> None:
    """Rank 0, after every rank saved: state, config, COMPLETE, then `latest`, then pruning."""
    ckpt = root / tag
    _atomic_write(ckpt / TRAINER_STATE, json.dumps(trainer_state, indent=2))
    _atomic_write(ckpt / "config.yaml", config_yaml)
    _atomic_write(ckpt / COMPLETE, json.dumps({"step": trainer_state["step"], "world_size": trainer_state["world_size"]}))
    _atomic_write(root / LATEST, tag)
    for old in complete_tags(root)[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)
    # Leftovers of saves that never completed, older than the newest complete one.
    for d in root.iterdir():
        if _TAG.match(d.name) and not is_complete(d) and d.name < tag:
            shutil.rmtree(d, ignore_errors=True)


def read_trainer_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / TRAINER_STATE).read_text())
