"""A run's checkpoints, saved and resumed, and the signals that call for one: the Checkpointer.

The loop (`Trainer.train()`, distil/train/trainer.py) asks it four things: which checkpoint to resume
from (`resume_tag`, found before the DeepSpeed engine exists: one written by another worker
count needs an engine that loads DeepSpeed's universal layout), `load()` before the first step,
`save()` at a checkpoint step, and `preempted()` after every step.

Which checkpoint a run resumes from is decided here, once, for every store (`find_resume`): the
store offers the run's checkpoints best first, each is fetched and fully verified (every file's
size and sha256, distil/runs/layout.py `damage`), a damaged one is named and passed over, and the
first intact one must agree with this config (distil/runs/continuity.py). Before any worker
starts, the launch only previews the run in storage (`continuity.check`: refused, finished, or
going on); that preview reads sizes, and hashes only a checkpoint it would call final. Behind it:

- the layout, verification and pruning of checkpoint folders (distil/runs/layout.py: every run
  keeps RUN/step_N, with COMPLETE written last; a local run prunes to `checkpoint.keep_last`
  as it completes one, a Ray run through Ray's `CheckpointConfig(num_to_keep)`);
- the store that makes a saved folder durable and restores the newest intact one
  (distil/runs/stores.py: the run folder itself, or Ray Train's storage with
  asynchronous uploads), and publishes the run's history beside the checkpoints;
- the preemption signals: SIGTERM to a local run (finish the step, checkpoint, stop), a pod
  drain announced by the worker pod's preStop hook (distil/runs/preempt.py: checkpoint, wait for the
  pod to go), and Ray's notice that a node of the worker group is being reclaimed.
"""

from __future__ import annotations

import calendar
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from distil.config.schema import DistilConfig
from distil.errors import UserError
from distil.runs import continuity, preempt, reshard
from distil.runs import layout as ckpt
from distil.runs.export import save_hf_skeleton
from distil.runs.heartbeat import Gap, Heartbeat, gap
from distil.runs.metrics_log import METRICS, MetricsLog
from distil.runs.stores import CheckpointStore


def find_resume(cfg: DistilConfig, store: CheckpointStore, root: Path, log=print) -> tuple[str | None, list[str]]:
    """(The checkpoint to resume from, fetched into `root` and intact; the damaged ones passed
    over): the first of the store's candidates whose files all match their manifest, each damaged
    one named through `log`. Its config must continue this one (a UserError with the difference
    if not). None: the run starts at step 0. Every candidate damaged: a UserError."""
    damaged: dict[str, str] = {}
    for tag, fetch in store.candidates(root):
        folder = fetch()
        problem = ckpt.damage(folder)
        if problem is None:
            if (folder / "config.yaml").is_file():  # (in the manifest of every checkpoint distil-run writes)
                continuity.check_continuation(cfg, (folder / "config.yaml").read_text(), str(folder))
            if damaged:
                log(f"resuming from {tag}, the newest intact checkpoint")
            return tag, list(damaged)
        damaged[tag] = problem
        store.discard(folder)
        log(f"warning: run {cfg.run_name()}'s checkpoint {tag} is damaged ({problem}); not resuming from it")
    if damaged:
        each = "; ".join(f"{tag}: {damaged[tag]}" for tag in sorted(damaged, key=ckpt.tag_key))
        raise UserError(
            f"every checkpoint of the run {cfg.run_name()} in {cfg.storage.uri} is damaged ({each})",
            where="checkpoint",
            fix="restore them from a copy, or start the run over: pass --start-over (the damaged "
            "checkpoints are moved aside) or set a new run.name",
        )
    return None, []


class Checkpointer:
    """Save, verify, resume and prune one rank's view of a run's checkpoints in `run_dir` (a Ray
    worker's is a local staging folder), made durable by `store`."""

    def __init__(self, cfg: DistilConfig, run_dir: Path, store: CheckpointStore, device: torch.device, log=print):
        self.cfg, self.run_dir, self.store, self.device = cfg, Path(run_dir), store, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.log = log if self.rank == 0 else (lambda _m: None)
        # checkpoint.resume was settled before the workers started (continuity.check); a Ray worker
        # group restarted after a lost worker resumes from its own run whatever it says.
        self.resume_tag, self.passed_over = find_resume(cfg, store, self.run_dir, self.log)
        self.saved_world = (
            ckpt.read_trainer_state(self.run_dir / self.resume_tag)["world_size"] if self.resume_tag else self.world
        )
        self.saved_step = -1  # the step of the newest checkpoint this rank saved or loaded
        self.heartbeat = Heartbeat(cfg.run_storage(), enabled=self.rank == 0)
        self.gap: Gap | None = None  # (rank 0, after load) since the run last trained
        self.stop_requested = False  # SIGTERM: checkpoint and return
        self._preemption_saved = False  # the checkpoint for a drain or Ray's notice is written

    @property
    def resharding(self) -> bool:
        """The checkpoint to resume from was written by another number of workers."""
        return self.saved_world != self.world

    # -- resume ------------------------------------------------------------------------
    def load(self, engine, state) -> dict | None:
        """Load the checkpoint found at start (`find_resume`: every file's size and sha256) into
        the engine, `state` (the trainer's step, tokens and sampler) and this rank's RNG streams;
        returns its COMPLETE record, or None when the run starts at step 0."""
        tag = self.resume_tag
        if tag is None:
            return None
        folder = self.run_dir / tag
        complete = ckpt.read_complete(folder)
        stale = ckpt.drop_unlisted(folder, complete["files"])
        if stale:
            self.log(
                f"{tag}: ignored {len(stale)} file(s) its manifest does not list, left by an unfinished save: {stale[:3]}"
            )
        load_dir = self.run_dir
        if self.resharding:  # re-partition the ZeRO-2 state for this worker count
            load_dir = reshard.to_universal(folder, self.run_dir / f"universal-rank{self.rank}")
        engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_dir != self.run_dir:
            shutil.rmtree(load_dir)
        state.load_state_dict(ckpt.read_trainer_state(folder))
        self.saved_step = complete["step"]  # that step's checkpoint exists: a drain right now needs no new one
        exact = ckpt.load_rank_state(folder, self.rank)
        how = (
            f"; written by {self.saved_world} workers, ZeRO-2 state re-partitioned for {self.world}"
            if self.resharding
            else ""
        )
        saved_at = complete.get("saved_at")
        saved = calendar.timegm(time.strptime(saved_at, "%Y-%m-%dT%H:%M:%SZ")) if saved_at else None
        self.gap = gap(self.heartbeat.last(), complete["step"], saved, time.time())  # (before this start's beat)
        self.log(
            f"resumed from {tag} (step {complete['step']}, {complete['tokens']:,} tokens){how}"
            f"{'' if exact else '; RNG streams re-seeded (new rank)'}{f'; {self.gap.text()}' if self.gap else ''}"
        )
        return complete

    def beat(self, step: int) -> None:
        """After every optimizer step: the run's sign of life in its storage (distil/runs/heartbeat.py)."""
        self.heartbeat.beat(step, self.world)

    def metrics_of(self, tag: str) -> Path:
        """The run's history as a checkpoint keeps it."""
        return self.run_dir / tag / METRICS

    # -- save --------------------------------------------------------------------------
    def save(
        self, step: int, engine, tokenizer, state: dict, summary: dict, metrics: MetricsLog, wait: bool = False
    ) -> None:
        """Write this step's checkpoint (every rank its part) and hand it to the store. Uploads run
        while training goes on, one at a time: a save first waits for the previous upload (so the
        local disk holds at most two checkpoints); `wait` also waits for this one (a drain, the
        end of the run). `state`: the trainer's state_dict(), the same on every rank."""
        if self.saved_step == step:
            return  # e.g. a pod drain's checkpoint, then the periodic one at the same step
        t0 = time.perf_counter()
        self.store.wait_uploaded()
        held = time.perf_counter() - t0  # training held for the previous upload
        t0 = time.perf_counter()
        tag = self.store.checkpoint_name(ckpt.tag_for(step), self.passed_over)
        folder = self.run_dir / tag
        if self.rank == 0:
            ckpt.clear_for_save(folder)
        dist.barrier()
        engine.save_checkpoint(str(self.run_dir), tag=tag, client_state=reshard.universal_info(), save_latest=False)
        ckpt.save_rank_state(folder, self.rank)
        dist.barrier()
        # Every rank hashes the files it wrote (a Ray worker sees only its own); rank 0's are
        # hashed in finalize, with the files it adds now.
        mine = ckpt.rank_manifest(folder, self.rank) if self.rank else {}
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank == 0:
            save_hf_skeleton(engine.module.model, tokenizer, folder)
            metrics.snapshot_into(folder)
            summary = {**summary, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            ckpt.finalize(
                self.run_dir,
                tag,
                state,
                self.cfg.to_yaml(),
                self.cfg.checkpoint.keep_last,
                manifest={k: v for part in parts for k, v in part.items()},
                summary=summary,
            )
        dist.barrier()
        self.saved_step = step
        t1 = time.perf_counter()
        self.store.persist(folder, {"step": step, "tokens": state["tokens"]})
        if wait:
            self.store.wait_uploaded()
        # upload_s: seconds training was held for uploads at this checkpoint (0 when they ran
        # during the steps before)
        metrics.write(
            {"step": step, "checkpoint/save_s": t1 - t0, "checkpoint/upload_s": held + time.perf_counter() - t1}
        )
        metrics.flush()
        if self.rank == 0:
            self.store.publish(self.run_dir)
        # Each rank waits for its own upload only: a drained pod must not be told "persisted"
        # (and go) while another rank is still uploading its shard.
        dist.barrier()

    def close(self) -> None:
        """At the end of the loop: publish the run's history, and wait for it and for any
        checkpoint upload still in flight."""
        if self.rank == 0:
            self.store.publish(self.run_dir)
        self.store.wait_uploaded()

    # -- preemption --------------------------------------------------------------------
    def preempted(self, step: int, save: Callable[[], None]) -> bool:
        """After each step, the same on every rank: checkpoint now (through `save`, uploaded
        before it returns) when a pod is being drained or Ray says a node is going; returns
        whether to stop (SIGTERM on any rank: the caller checkpoints and returns)."""
        self.stop_requested, drained = self._any_rank(self.stop_requested, preempt.requested())
        if (drained or self.store.preemption_notice()) and not self._preemption_saved:
            save()  # just in time, with the step in flight finished
            self._preemption_saved = True
            if drained:  # a pod's preStop hook: see distil/runs/preempt.py
                preempt.wait_out(step, self.log if self.rank == 0 else None)
                self._preemption_saved = False  # a cancelled drain: training went on
        return self.stop_requested

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true when it is on any rank: ranks stop and checkpoint at the same step."""
        if self.world == 1:
            return flags
        vec = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in vec.tolist())

    def request_stop(self, *_) -> None:
        """SIGTERM (a preemption notice): finish the current step, checkpoint, and return."""
        self.stop_requested = True

    def install_signal_handler(self) -> None:
        """Only the main thread may set handlers; Ray Train runs the loop in another thread and
        announces preemption through its own API instead (see RayCheckpointStore)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
