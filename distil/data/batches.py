"""Prepared sequences -> resumable batches.

The text was read, tokenized and packed once (distil/data/prepared.py); here are the sampler over
the prepared sequences and the batches made from them.

The sampler is a seeded permutation per epoch; its position counts *global* samples, so a
resumed run -- with the same or another number of workers -- continues exactly where the
last checkpoint left off.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def collate(rows: list[list[int]], pad_id: int, max_len: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row, rounded up to a multiple of `multiple`: 8 on a GPU (tensor-
    core friendly); 1 on a CPU, where every pad position is compute spent (with sentences of ~19
    tokens, rounding to 8 padded ~18% more positions)."""
    longest = max(len(r) for r in rows)
    width = min(max_len, -(-longest // multiple) * multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


class ResumableSampler:
    """Global sample order: a seeded permutation per epoch, the tail smaller than a global batch
    (a step) dropped. Position = (epoch, samples consumed in it), independent of workers.

    With `lengths`, the permutation is cut into groups of `group` samples, each sorted by
    length, so that consecutive batches hold sequences of similar length and little padding
    (DistilBERT's group_by_size). The group size is fixed, not derived from the batch size,
    so the order stays the same whatever the number of workers.
    """

    def __init__(
        self, n: int, seed: int, lengths: np.ndarray | None = None, group: int = 1024, step_size: int | None = None
    ):
        # step_size: the global batch. An epoch ends where the next whole *step* no longer fits, not
        # the next micro-batch: then every worker count (an elastic run's group resizes) trains the
        # same samples in each step, also across an epoch's end.
        self.n, self.seed, self.lengths, self.group, self.step_size = n, seed, lengths, group, step_size
        self.epoch, self.consumed = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            if self.lengths is not None:
                chunks = [perm[i : i + self.group] for i in range(0, self.n, self.group)]
                perm = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
            self._perm = perm
        return self._perm

    def next_indices(self, global_size: int, rank: int, local_size: int) -> np.ndarray:
        """This rank's slice of the next global micro-batch of `global_size` samples."""
        starts_step = self.step_size is not None and self.consumed % self.step_size == 0
        if self.consumed + (self.step_size if starts_step else global_size) > self.n:
            self.epoch, self.consumed, self._perm = self.epoch + 1, 0, None
        start = self.consumed + rank * local_size
        out = self._permutation()[start : start + local_size]
        self.consumed += global_size
        return out

    def peek(self, global_size: int, rank: int, local_size: int) -> np.ndarray:
        """What next_indices would return, without moving this sampler."""
        return copy.copy(self).next_indices(global_size, rank, local_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler saw {state['n']} samples (seed {state['seed']}), this run has "
                f"{self.n} (seed {self.seed}): the data changed since the checkpoint"
            )
        self.epoch, self.consumed, self._perm = state["epoch"], state["consumed"], None


class Lookahead:
    """Makes the next micro-batch on a background thread while the current step runs on the GPU
    (collating and masking a 64k-token micro-batch takes ~80 ms of a CPU core: as long as half a
    GPU step). `make(key, indices)` builds a batch; `get` returns the one asked for, made ahead
    when it was announced as the next one with the same indices, else made now, and starts on
    the one announced next. Which samples come next is known from a copy of the sampler
    (`ResumableSampler.peek`), so the real one, saved in checkpoints, only moves as batches are
    consumed."""

    def __init__(self, make):

        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distil-batches")
        self._next = None  # (key, indices, future)

    def get(self, key, indices: np.ndarray, next_key, next_indices: np.ndarray):
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == key and np.array_equal(ahead[1], indices):
            batch = ahead[2].result()
        else:  # the first batch, or the position moved (a resume): what was made ahead is not it
            if ahead is not None:
                ahead[2].cancel()
            batch = self._make(key, indices)
        self._next = (next_key, next_indices, self._pool.submit(self._make, next_key, next_indices))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None
