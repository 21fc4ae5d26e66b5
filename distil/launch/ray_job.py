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

# Imports inside functions: Ray and the training stack only once the input has passed the checks
# that need none of it: a refused run answers in a second.
import os
import re
import shutil
import tempfile
from pathlib import Path

from distil.config.schema import DistilConfig
from distil.data.prepared import ensure_prepared
from distil.errors import UserError
from distil.launch import sequence
from distil.processes import gone
from distil.quiet import quiet_libraries
from distil.runs.metrics_log import summary_lines
from distil.runs.stores import RayCheckpointStore


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the same loop as a local run, with Ray's checkpoint storage."""
    import ray.train

    from distil.train.setup import init_distributed, load_inputs
    from distil.train.trainer import Trainer

    quiet_libraries()
    # Ray Train runs the loop in a working directory of its own: relative paths in the config
    # (`./models/...`, `runs`) mean what they meant to the driver, whose folder this node has
    # when it is the driver's node or the job's `--working-dir` (unpacked at one path on every node).
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    cfg = DistilConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    prep = load_inputs(cfg, world_size=ctx.get_world_size(), fingerprint=loop_config.get("prepared"))
    init_distributed(prep.device)
    local = staging_folder(cfg.run_name(), ctx.get_world_rank())
    try:
        trainer = Trainer(prep, local, store=RayCheckpointStore(cfg))
        trainer.checkpointer.install_signal_handler()
        result = trainer.train()
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if ctx.get_world_rank() == 0 and not result["stopped"]:
        print("\n".join(summary_lines(result)), flush=True)


_STAGING = re.compile(r"distil-.+-rank\d+-pid(\d+)-[^/]+")


def staging_folder(run_name: str, rank: int, tmp: Path | None = None) -> Path:
    """A worker's local folder: its checkpoints on their way to storage, the checkpoint it resumed
    from (fetched whole: gigabytes for a large student) and its history. A worker that ends
    removes its own; one that is killed (a lost worker, every resize of an elastic run: Ray stops a
    group by killing its actors) cannot, so the folders of workers of this node that are gone are
    removed here first, before this one fetches anything -- else each restart would leave a
    checkpoint's worth of disk behind, until the pod's ephemeral storage ran out."""
    tmp = Path(tmp or tempfile.gettempdir())
    for old in tmp.glob("distil-*-rank*-pid*-*"):
        m = _STAGING.fullmatch(old.name)
        if m and old.is_dir() and gone(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"distil-{run_name}-rank{rank}-pid{os.getpid()}-", dir=tmp))


class RayPath:
    """This process is the driver of a Ray Train run: it checks, prepares the data, holds the
    lease and runs a `TorchTrainer` whose workers train (distil/launch/sequence.py has the order)."""

    leads = True

    def __init__(self, cfg: DistilConfig):
        # Where relative paths in the config point, taken before Ray runs anything: a job's
        # `--working-dir` copy, the driver's cwd, can be cleaned up by Ray while the job runs.
        self.cwd = os.getcwd()

    def log(self, message: str) -> None:
        print(message, flush=True)

    announce = log

    def worker_counts(self, cfg: DistilConfig) -> list[int]:
        return list(cfg.scaling.worker_counts())  # (an elastic run: every count of its range)

    def check_storage(self, cfg: DistilConfig) -> None:
        cfg.storage_root().check_writable()  # an S3 marker written, read and deleted: before any worker starts

    def load(self, cfg: DistilConfig) -> str:
        """The teacher, the precision for the workers' device and the data, prepared once by Ray
        Data tasks over the cluster's CPUs before any worker starts (the workers open the shards
        and never tokenize); the prepared data's fingerprint."""

        quiet_libraries()
        import ray

        from distil.model.teacher import load_teacher_config, load_tokenizer, validate_against_teacher
        from distil.train.setup import check_precision

        validate_against_teacher(cfg, load_teacher_config(cfg))
        check_precision(cfg, gpu=cfg.scaling.use_gpu)
        if not ray.is_initialized():
            # With its dashboard (~1 s more): Ray Train's placement-group cleaner asks the State API,
            # which the dashboard serves; without it the job's log gets a warning every second.
            ray.init(log_to_driver=True)
        data = ensure_prepared(cfg, load_tokenizer(cfg), cfg.train.global_batch_size, log=self.log, use_ray=True)
        return data["fingerprint"]

    def join(self, inputs) -> None:  # the workers join Ray Train's process group when they start
        pass

    def barrier(self) -> None:
        pass

    def train(self, cfg: DistilConfig, fingerprint: str) -> dict:
        """The Ray Train run itself; Ray resumes the latest registered checkpoint of the run name."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        s = cfg.scaling
        storage_path, filesystem = cfg.storage_root().arrow()
        # Ray Train sends a worker's print() both to its logger (stderr) and to stdout: every line
        # of the job's log would come twice. Our lines are plain prints; Ray passes this to the workers.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        if s.worker_group_start_timeout_s is not None:  # (read by Ray's controller, which gets the driver's value)
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(s.worker_group_start_timeout_s)
        resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "prepared": fingerprint, "cwd": self.cwd},
            scaling_config=ScalingConfig(
                num_workers=s.num_workers,  # (min, max): elastic, Ray's ElasticScalingPolicy resizes the group
                use_gpu=s.use_gpu,
                resources_per_worker=resources,
                elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
            ),
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.run_name(),
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=s.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:
            user_error = _user_error_in(e)  # bad input a worker found: its message, not Ray's
            if user_error is None:
                raise
            raise user_error from None
        return {"checkpoint": result.checkpoint.path if result.checkpoint else None, "metrics": result.metrics}

    def finish(self, cfg: DistilConfig, result: dict) -> dict:
        """The workers printed the summary (rank 0); here, where the run is and its model."""
        where = result["checkpoint"]
        print(f"run {cfg.run_name()} finished: latest checkpoint {where} in {cfg.storage.uri}", flush=True)
        if where and not cfg.storage_root().is_s3:
            from distil.runs.export import export_checkpoint

            model_dir = cfg.run_storage().local().resolve() / "model"  # the latest checkpoint's, also after a resume
            result["model_dir"] = str(export_checkpoint(Path(where), model_dir, replace=True))
            print(f"model in {model_dir}", flush=True)
        return result

    def teardown(self) -> None:  # Ray Train stops its workers; a local Ray instance ends with this process
        pass


def launch(cfg: DistilConfig, start_over: bool = False) -> dict:
    """`distil train --ray` / jobs/distill.py: validate on the driver, then train on Ray (a local
    Ray instance when no cluster is given)."""
    return sequence.run(cfg, RayPath(cfg), start_over)


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
