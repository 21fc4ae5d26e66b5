"""The one order in which a run is launched, locally or on Ray; each path supplies what differs.

    checks     the config against the worker count, the storage (writable, reachable)
    continuity whether this config continues the run in storage, or the run is finished (read-only:
               distil/runs/continuity.py `check`, the same for both paths)
    inputs     the teacher, the precision for the device, the data (prepared once)
    lease      the run's lease (distil/runs/lease.py), by the process that leads the run
    start      --start-over moves the old run aside; else continuity again, under the lease
    loop       the training (one process, torchrun ranks, or Ray Train workers), whose
               Checkpointer chooses, verifies and loads the checkpoint to resume from
    finish     the summary, the exported model
    teardown   process group closed, lease released

Everything that can be wrong with the input is found before anything of the run changes, so a
refused command leaves the run as it was; and nothing changes the run but the process that
holds its lease.
"""

from __future__ import annotations

from typing import Any, Protocol

from distil.config.schema import DistilConfig
from distil.runs import continuity
from distil.runs.lease import RunLease


class LaunchPath(Protocol):
    """What a way of running differs in (distil/launch/local.py, distil/launch/ray_job.py)."""

    leads: bool  # this process holds the lease and moves the run aside (a local run's rank 0, the Ray driver)

    def log(self, message: str) -> None: ...
    def announce(self, message: str) -> None: ...  # what a finished run says (stdout, the leader only)
    def worker_counts(self, cfg: DistilConfig) -> list[int]: ...  # every count the run may train with
    def check_storage(self, cfg: DistilConfig) -> None: ...
    def load(self, cfg: DistilConfig) -> Any: ...  # the inputs the loop needs, checked
    def join(self, inputs: Any) -> None: ...  # every process of the run is here (after the lease)
    def barrier(self) -> None: ...
    def train(self, cfg: DistilConfig, inputs: Any) -> dict: ...
    def finish(self, cfg: DistilConfig, result: dict) -> dict: ...
    def teardown(self) -> None: ...


def run(cfg: DistilConfig, path: LaunchPath, start_over: bool = False) -> dict:
    """Launch (or resume) `cfg`'s run on `path`; the result of its finish, or `finished: True`."""
    cfg.check_before_loading(path.worker_counts(cfg))
    path.check_storage(cfg)
    seen = None
    if not start_over:  # a refused or finished run says so before seconds of loading
        seen = continuity.check(cfg, path.log)
        if seen.finished:
            return _finished(cfg, path, seen.finished)
    inputs = path.load(cfg)
    lease = RunLease(cfg.storage_root(), cfg.run_name(), log=path.log).acquire() if path.leads else None
    try:
        path.join(inputs)  # (a torchrun rank waits here for rank 0, which holds the lease now)
        if start_over:
            if path.leads:
                continuity.start_over(cfg, path.log)
            path.barrier()
        else:  # again, now that no other process can change the run (it said what it found the first time)
            now = continuity.check(cfg, lambda _m: None)
            if now.finished:
                return _finished(cfg, path, now.finished)
            if now.newest != seen.newest and path.leads:
                path.log(f"the run changed while this start was loading: its newest checkpoint is {now.newest}")
        return path.finish(cfg, path.train(cfg, inputs))
    finally:
        path.teardown()
        if lease is not None:
            lease.release()


def _finished(cfg: DistilConfig, path: LaunchPath, message: str) -> dict:
    if path.leads:
        path.announce(message)
    return {"step": cfg.train.max_steps, "stopped": False, "finished": True, "checkpoint": None, "metrics": {}}
