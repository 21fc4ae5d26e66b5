"""Ray Train launcher: one DeepSpeed rank per Ray Train worker, checkpoints in Ray's storage.

The driver validates the config, then runs a `TorchTrainer` whose `RunConfig(name,
storage_path)` is the run's identity: running the same command again resumes from the latest
*registered* checkpoint (Ray Train V2 semantics). Every rank saves its ZeRO shard into a local
folder and hands it to `ray.train.report`; Ray merges the ranks' folders into one checkpoint
in storage and registers it only once all of them are uploaded, so a partial upload is never
resumed from. `FailureConfig(max_failures)` restarts a worker group that lost a worker or a
node from that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from distil import checkpoint as ckpt
from distil.config import DistilConfig
from distil.errors import UserError


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

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                         checkpoint_dir_name=ckpt_dir.name, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    def wait_uploaded(self) -> None:
        """Until every checkpoint this rank reported is uploaded and handed to Ray's controller.
        (Ray 2.60 has no public call for it: its train context counts reports made and reports
        handed over, under a condition; a failed upload is queued as the training thread's
        error instead, and raised here.)"""
        from ray.train.v2._internal.execution.context import get_train_context

        ctx = get_train_context()
        errors = ctx.execution_context.training_thread_runner.get_exception_queue()
        with ctx.report_order_condition:
            while not ctx.report_order_condition.wait_for(lambda: ctx.current_report_index >= ctx.report_call_index, timeout=1.0):
                if not errors.empty():
                    raise RuntimeError("a checkpoint upload failed (Ray restarts the worker group from the last registered one)")
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
        raise UserError(f"every checkpoint of run {self.cfg.run_name()} in {self.cfg.storage.uri} is damaged "
                        f"({', '.join(damaged)})", where="checkpoint",
                        fix="restore them from a copy, or start over: --start-over moves the run aside")

    @staticmethod
    def _candidates(registered):
        """Ray's registered checkpoint, then the older step_N folders beside it, newest first."""
        import ray.train
        from pyarrow import fs as pafs

        tag = Path(registered.path).name  # report() named it after the step
        yield tag, registered
        parent = registered.path.rsplit("/", 1)[0]
        infos = registered.filesystem.get_file_info(pafs.FileSelector(parent))
        older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                        and ckpt.is_tag(i.base_name) and ckpt.tag_key(i.base_name) < ckpt.tag_key(tag)),
                       key=ckpt.tag_key, reverse=True)
        for name in older:
            yield name, ray.train.Checkpoint(f"{parent}/{name}", filesystem=registered.filesystem)

    def publish(self, run_dir: Path) -> None:
        """Copy the run's history (metrics.jsonl, TensorBoard events) to STORAGE/RUN/ on a thread
        of its own, like the checkpoint uploads: a snapshot is taken here (local, instant), the
        copy to storage goes on while training does; `wait_uploaded` waits for it."""
        from concurrent.futures import ThreadPoolExecutor

        from distil.metrics_log import METRICS, TENSORBOARD

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

        from distil.metrics_log import METRICS, TENSORBOARD

        try:
            if self._target is None:  # made once per worker, not at every checkpoint
                storage_path, filesystem = self.cfg.storage_root().arrow()
                self._target = storage_path, filesystem or pafs.LocalFileSystem()
            storage_path, filesystem = self._target
            dest = f"{storage_path}/{self.cfg.run_name()}"
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


def preflight(cfg: DistilConfig) -> None:
    """Write, read and delete a marker object before any worker starts."""
    if not cfg.storage.uri.startswith("s3://"):
        return
    from distil.storage import s3_errors

    store = cfg.storage_root()
    key = f"{store.prefix}/.distil-preflight-{os.getpid()}".lstrip("/")
    with s3_errors(cfg.storage.uri, cfg.storage.endpoint_url):
        client = store.client()
        client.put_object(Bucket=store.bucket, Key=key, Body=b"ok")
        if client.get_object(Bucket=store.bucket, Key=key)["Body"].read() != b"ok":
            raise UserError(f"{cfg.storage.uri}: the marker object read back differs", where="storage")
        client.delete_object(Bucket=store.bucket, Key=key)


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the same loop as a local run, with Ray's checkpoint storage."""
    from distil.quiet import quiet_libraries
    from distil.train import Trainer, init_distributed, prepare

    import ray.train

    quiet_libraries()
    # Ray Train runs the loop in a working directory of its own: relative paths in the config
    # (`./models/...`, `runs`) mean what they meant to the driver, whose folder this node has
    # when it is the driver's node or the job's `--working-dir` (unpacked at one path on every node).
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    cfg = DistilConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    prep = prepare(cfg, world_size=ctx.get_world_size(), fingerprint=loop_config.get("prepared"))
    init_distributed(prep.device)
    local = Path(tempfile.mkdtemp(prefix=f"distil-{cfg.run_name()}-rank{ctx.get_world_rank()}-"))
    trainer = Trainer(prep, local, store=RayCheckpointStore(cfg))
    trainer.install_signal_handler()
    result = trainer.train()
    if ctx.get_world_rank() == 0 and not result["stopped"]:
        from distil.metrics_log import summary_lines

        print("\n".join(summary_lines(result)), flush=True)


def launch(cfg: DistilConfig, start_over: bool = False) -> dict:
    """Validate on the driver, then train on Ray (a local Ray instance when no cluster is given)."""
    # Where relative paths in the config point, taken before Ray runs anything: a job's
    # `--working-dir` copy, the driver's cwd, can be cleaned up by Ray while the job runs.
    cwd = os.getcwd()
    cfg.check_before_loading(cfg.scaling.num_workers)  # (also for hub data, which only workers load)
    from distil import continuity
    from distil.quiet import quiet_libraries
    from distil.storage import check_storage_folder

    if not cfg.storage.uri.startswith("s3://"):
        check_storage_folder(cfg.storage.uri)
    preflight(cfg)
    if start_over:
        continuity.start_over(cfg, lambda m: print(m, flush=True))
    else:
        finished = continuity.stored_resume_point(cfg, lambda m: print(m, flush=True))
        if finished:
            print(finished, flush=True)
            return {"checkpoint": None, "metrics": {}, "finished": True}
    quiet_libraries()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distil.model import load_teacher_config, validate_against_teacher
    from distil.prepared import ensure_prepared
    from distil.train import check_precision, load_tokenizer

    validate_against_teacher(cfg, load_teacher_config(cfg))
    s = cfg.scaling
    check_precision(cfg, gpu=s.use_gpu)
    if not ray.is_initialized():
        # With its dashboard (~1 s more): Ray Train's placement-group cleaner asks the State API,
        # which the dashboard serves; without it the job's log gets a warning every second.
        ray.init(log_to_driver=True)
    # The data is prepared once, before any worker starts, by Ray Data tasks over the cluster's
    # CPUs (distil/prepared.py): workers open the prepared shards and never tokenize.
    cfg.check_batch_split(s.num_workers)
    data = ensure_prepared(cfg, load_tokenizer(cfg), cfg.train.micro_batch_size * s.num_workers,
                           log=lambda m: print(m, flush=True), use_ray=True)
    storage_path, filesystem = cfg.storage_root().arrow()
    # Ray Train sends a worker's print() both to its logger (stderr) and to stdout: every line of
    # the job's log would come twice. Our lines are plain prints; Ray passes this to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "prepared": data["fingerprint"], "cwd": cwd},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run_name(), storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise _user_error_in(e) or e
    where = result.checkpoint.path if result.checkpoint else None
    print(f"run {cfg.run_name()} finished: latest checkpoint {where} in {cfg.storage.uri}", flush=True)
    out = {"checkpoint": where, "metrics": result.metrics}
    if where and not cfg.storage.uri.startswith("s3://"):
        from distil.export import export_checkpoint

        model_dir = Path(storage_path) / cfg.run_name() / "model"  # the latest checkpoint's, also after a resume
        out["model_dir"] = str(export_checkpoint(Path(where), model_dir, replace=True))
        print(f"model in {model_dir}", flush=True)
    return out


def _user_error_in(e: BaseException) -> UserError | None:
    """Bad input found by a worker (e.g. an empty hub data set): surface its message, not Ray's."""
    failures = getattr(e, "worker_failures", None) or {}
    for failure in failures.values():
        chain = failure
        while chain is not None:
            if isinstance(chain, UserError):
                return chain
            chain = chain.__cause__ or chain.__context__
    return None
