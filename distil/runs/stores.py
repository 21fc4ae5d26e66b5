"""Where a run's checkpoints go and come back from: one interface, `CheckpointStore`, and its two
implementations. `Trainer` (distil/train/trainer.py) writes a checkpoint folder and hands it to its
store; the store makes it durable, restores the newest intact one on a start, names the folders,
publishes the run's history, and says when the node is being reclaimed.

- `LocalCheckpointStore`: `distil train`, checkpoints in the run folder itself.
- `RayCheckpointStore`: a Ray Train worker; checkpoints go through `ray.train.report` to Ray's
  storage (local or S3), uploaded while training goes on.
"""

from __future__ import annotations

# Imports inside functions: pyarrow and Ray Train only in a Ray run.
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from distil.config.schema import DistilConfig
from distil.errors import UserError
from distil.runs import layout as ckpt
from distil.runs.metrics_log import METRICS, TENSORBOARD


class CheckpointStore(Protocol):
    def restore(self, root: Path) -> str | None:
        """The tag of the checkpoint to resume from, its folder present under `root` (fetched
        when it lives elsewhere), intact (sizes, sha256); None: start from step 0."""

    def checkpoint_name(self, tag: str) -> str:
        """The folder name for a new checkpoint of `tag`'s step."""

    def persist(self, ckpt_dir: Path, metrics: dict) -> None:
        """Make the checkpoint folder durable (it may return before it is, see wait_uploaded)."""

    def wait_uploaded(self) -> None:
        """Until everything this rank persisted or published is in storage."""

    def publish(self, run_dir: Path) -> None:
        """Copy the run's history (metrics.jsonl, TensorBoard events) where users look for it."""

    def preemption_notice(self) -> bool:
        """Whether the platform says this worker's node is going away (a collective call)."""


class LocalCheckpointStore:
    """Checkpoints stay in the run folder; resume from its newest intact one (or the one the
    caller found already: `resume_tag`, see continuity.local_resume_point)."""

    def __init__(self, resume_tag: str | None = None, found: bool = False):
        self.resume_tag, self.found = resume_tag, found or resume_tag is not None

    def persist(self, ckpt_dir: Path, metrics: dict) -> None:
        pass  # the checkpoint was written where it is kept

    def wait_uploaded(self) -> None:
        pass  # nothing is uploaded

    def publish(self, run_dir: Path) -> None:
        pass  # metrics.jsonl and TensorBoard events are written in the run folder itself

    def restore(self, root: Path) -> str | None:
        return self.resume_tag if self.found else ckpt.find_resumable(root)

    def checkpoint_name(self, tag: str) -> str:
        return tag  # a step saved again replaces its folder (clear_for_save)

    def preemption_notice(self) -> bool:
        return False  # a local run learns of preemption through SIGTERM


class RayCheckpointStore:
    """Persists checkpoints through ray.train.report and restores the latest registered one;
    publishes metrics.jsonl and TensorBoard events to STORAGE/RUN/ (where `distil plot` and
    `tensorboard --logdir` look)."""

    def __init__(self, cfg: DistilConfig):
        self.cfg = cfg
        self._target = None  # (storage path, pyarrow filesystem), made on the first publish
        self.damaged: list[str] = []  # registered checkpoints passed over on restore
        self._publisher = None  # one thread: the run's history is copied to storage in order
        self._published = None  # the latest copy's future

    def checkpoint_name(self, tag: str) -> str:
        """The folder for a checkpoint of `tag`'s step. A step trained again after a fall-back from
        a damaged checkpoint gets `.1` (`.2`, ...): Ray has that folder registered and deletes it by
        its path when it prunes the damaged one."""
        step, n = ckpt.tag_key(tag)
        while tag in self.damaged:
            n += 1
            tag = ckpt.tag_for(step, n)
        return tag

    def persist(self, ckpt_dir: Path, metrics: dict) -> None:
        """Hand the checkpoint to Ray and go on training: Ray uploads it on a thread of its own
        (one upload at a time, in order), deletes the local copy, and registers the checkpoint
        once every rank's upload is in (`wait_uploaded` waits for this rank's)."""
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
            checkpoint_dir_name=ckpt_dir.name,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )

    def wait_uploaded(self) -> None:
        """Until every checkpoint this rank reported is uploaded and handed to Ray's controller.
        (Ray 2.60 has no public call for it: its train context counts reports made and reports
        handed over, under a condition; a failed upload is queued as the training thread's
        error instead, and raised here.)"""
        from ray.train.v2._internal.execution.context import get_train_context

        ctx = get_train_context()
        errors = ctx.execution_context.training_thread_runner.get_exception_queue()
        with ctx.report_order_condition:
            while not ctx.report_order_condition.wait_for(
                lambda: ctx.current_report_index >= ctx.report_call_index, timeout=1.0
            ):
                if not errors.empty():
                    raise RuntimeError(
                        "a checkpoint upload failed (Ray restarts the worker group from the last registered one)"
                    )
        if self._published is not None:
            self._published.result()  # (raises what the copy raised)

    def restore(self, root: Path) -> str | None:
        """The newest intact checkpoint of the run, fetched into root: Ray's latest registered
        one, or, when that one is damaged in storage (sizes, sha256), the newest intact older
        one in the run's folder; each damaged one is named. None intact: UserError."""
        import ray.train

        registered = ray.train.get_checkpoint()
        if registered is None:
            return None
        rank0 = ray.train.get_context().get_world_rank() == 0
        damaged = self.damaged = []
        for tag, checkpoint in self._candidates(registered):
            shutil.rmtree(root / tag, ignore_errors=True)
            checkpoint.to_directory(str(root / tag))
            problem = ckpt.damage(root / tag)
            if problem is None:
                if damaged and rank0:
                    print(f"resuming from {tag}, the newest intact checkpoint", flush=True)
                return tag
            damaged.append(tag)
            shutil.rmtree(root / tag, ignore_errors=True)
            if rank0:
                print(f"warning: checkpoint {checkpoint.path} is damaged ({problem}); not resuming from it", flush=True)
        raise UserError(
            f"every checkpoint of run {self.cfg.run_name()} in {self.cfg.storage.uri} is damaged "
            f"({', '.join(damaged)})",
            where="checkpoint",
            fix="restore them from a copy, or start over: --start-over moves the run aside",
        )

    @staticmethod
    def _candidates(registered):
        """Ray's registered checkpoint, then the older step_N folders beside it, newest first."""
        import ray.train
        from pyarrow import fs as pafs

        tag = Path(registered.path).name  # report() named it after the step
        yield tag, registered
        parent = registered.path.rsplit("/", 1)[0]
        infos = registered.filesystem.get_file_info(pafs.FileSelector(parent))
        older = sorted(
            (
                i.base_name
                for i in infos
                if i.type == pafs.FileType.Directory
                and ckpt.is_tag(i.base_name)
                and ckpt.tag_key(i.base_name) < ckpt.tag_key(tag)
            ),
            key=ckpt.tag_key,
            reverse=True,
        )
        for name in older:
            yield name, ray.train.Checkpoint(f"{parent}/{name}", filesystem=registered.filesystem)

    def publish(self, run_dir: Path) -> None:
        """Copy the run's history (metrics.jsonl, TensorBoard events) to STORAGE/RUN/ on a thread
        of its own, like the checkpoint uploads: a snapshot is taken here (local, instant), the
        copy to storage goes on while training does; `wait_uploaded` waits for it."""

        snapshot = Path(tempfile.mkdtemp(prefix="distil-history-"))
        if (run_dir / METRICS).is_file():
            shutil.copy(run_dir / METRICS, snapshot / METRICS)
        if (run_dir / TENSORBOARD).is_dir():
            shutil.copytree(run_dir / TENSORBOARD, snapshot / TENSORBOARD)
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="distil-publish")
        self._published = self._publisher.submit(self._copy_history, snapshot)

    def _copy_history(self, snapshot: Path) -> None:
        from pyarrow import fs as pafs

        try:
            if self._target is None:  # made once per worker, not at every checkpoint
                dest, filesystem = self.cfg.run_storage().arrow()
                self._target = dest, filesystem or pafs.LocalFileSystem()
            dest, filesystem = self._target
            filesystem.create_dir(dest, recursive=True)
            if (snapshot / METRICS).is_file():
                pafs.copy_files(str(snapshot / METRICS), f"{dest}/{METRICS}", destination_filesystem=filesystem)
            if (snapshot / TENSORBOARD).is_dir():  # (its event files; a local destination folder must exist)
                filesystem.create_dir(f"{dest}/{TENSORBOARD}", recursive=True)
                pafs.copy_files(str(snapshot / TENSORBOARD), f"{dest}/{TENSORBOARD}", destination_filesystem=filesystem)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def preemption_notice(self) -> bool:
        """Ray's notice that a node of this worker group is being reclaimed (a collective call)."""
        import ray.train

        return ray.train.get_preemption_info() is not None
