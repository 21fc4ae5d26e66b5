"""Where a run's checkpoints go and come back from: one interface, `CheckpointStore`, and its two
implementations. `Trainer` (distil/train/trainer.py) writes a checkpoint folder and hands it to its
store; the store makes it durable, offers the run's checkpoints to resume from (the Checkpointer
verifies them and chooses), names the folders, publishes the run's history, and says when the
node is being reclaimed.

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
from typing import Callable, Iterator, Protocol

from distil.config.schema import DistilConfig
from distil.runs import layout as ckpt
from distil.runs.metrics_log import METRICS, TENSORBOARD


class CheckpointStore(Protocol):
    def candidates(self, root: Path) -> Iterator[tuple[str, Callable[[], Path]]]:
        """The run's checkpoints to resume from, best first, as (tag, fetch): `fetch()` puts that
        checkpoint's folder under `root` (a download, for a store elsewhere) and returns it. Which
        one is resumed is the Checkpointer's decision (distil/runs/checkpointer.py `find_resume`)."""

    def discard(self, folder: Path) -> None:
        """A fetched checkpoint found damaged: remove the fetched copy (never the stored one)."""

    def checkpoint_name(self, tag: str, passed_over: list[str]) -> str:
        """The folder name for a new checkpoint of `tag`'s step (`passed_over`: the damaged
        checkpoints this start did not resume from)."""

    def persist(self, ckpt_dir: Path, metrics: dict) -> None:
        """Make the checkpoint folder durable (it may return before it is, see wait_uploaded)."""

    def wait_uploaded(self) -> None:
        """Until everything this rank persisted or published is in storage."""

    def publish(self, run_dir: Path) -> None:
        """Copy the run's history (metrics.jsonl, TensorBoard events) where users look for it."""

    def preemption_notice(self) -> bool:
        """Whether the platform says this worker's node is going away (a collective call)."""


class LocalCheckpointStore:
    """Checkpoints stay in the run folder, which is `root` itself."""

    def candidates(self, root: Path) -> Iterator[tuple[str, Callable[[], Path]]]:
        """The checkpoint `latest` names, then every other complete one, newest first."""
        pointed = ckpt.latest_tag(root)
        for tag in ([pointed] if pointed else []) + [t for t in reversed(ckpt.complete_tags(root)) if t != pointed]:
            yield tag, lambda tag=tag: root / tag

    def discard(self, folder: Path) -> None:
        pass  # the stored checkpoint itself: left for the user to look at (a save of its step replaces it)

    def checkpoint_name(self, tag: str, passed_over: list[str]) -> str:
        return tag  # a step saved again replaces its folder (clear_for_save)

    def persist(self, ckpt_dir: Path, metrics: dict) -> None:
        pass  # the checkpoint was written where it is kept

    def wait_uploaded(self) -> None:
        pass  # nothing is uploaded

    def publish(self, run_dir: Path) -> None:
        pass  # metrics.jsonl and TensorBoard events are written in the run folder itself

    def preemption_notice(self) -> bool:
        return False  # a local run learns of preemption through SIGTERM


class RayCheckpointStore:
    """Persists checkpoints through ray.train.report and offers the latest registered one first;
    publishes metrics.jsonl and TensorBoard events to STORAGE/RUN/ (where `distil plot` and
    `tensorboard --logdir` look)."""

    def __init__(self, cfg: DistilConfig):
        self.cfg = cfg
        self._target = None  # (storage path, pyarrow filesystem), made on the first publish
        self._publisher = None  # one thread: the run's history is copied to storage in order
        self._published = None  # the latest copy's future

    def checkpoint_name(self, tag: str, passed_over: list[str]) -> str:
        """The folder for a checkpoint of `tag`'s step. A step trained again after a fall-back from
        a damaged checkpoint gets `.1` (`.2`, ...): Ray has that folder registered and deletes it by
        its path when it prunes the damaged one."""
        step, n = ckpt.tag_key(tag)
        while tag in passed_over:
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

    def candidates(self, root: Path) -> Iterator[tuple[str, Callable[[], Path]]]:
        """Ray's latest registered checkpoint of the run (none: a start at step 0), then the older
        step_N folders beside it in storage, newest first (a fall-back when it is damaged)."""
        import ray.train
        from pyarrow import fs as pafs

        registered = ray.train.get_checkpoint()
        if registered is None:
            return
        tag = Path(registered.path).name  # report() named it after the step
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
        stored = [(tag, registered)] + [
            (name, ray.train.Checkpoint(f"{parent}/{name}", filesystem=registered.filesystem)) for name in older
        ]
        for name, checkpoint in stored:
            yield name, lambda name=name, checkpoint=checkpoint: self._fetch(checkpoint, root / name)

    @staticmethod
    def _fetch(checkpoint, folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        checkpoint.to_directory(str(folder))
        return folder

    def discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def publish(self, run_dir: Path) -> None:
        """Copy the run's history (metrics.jsonl, TensorBoard events) to STORAGE/RUN/ on a thread
        of its own, like the checkpoint uploads: a snapshot is taken here (local, instant), the
        copy to storage goes on while training does; `wait_uploaded` waits for it."""

        # (in the worker's folder: a worker killed with a copy queued leaves it to that folder's cleanup)
        snapshot = Path(tempfile.mkdtemp(prefix=".history-", dir=run_dir))
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
