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
import tempfile
from pathlib import Path

from distil.checkpoint_stores import RayCheckpointStore
from distil.config import DistilConfig
from distil.errors import UserError


def preflight(cfg: DistilConfig) -> None:
    """Write, read and delete a marker object before any worker starts."""
    store = cfg.storage_root()
    if not store.is_s3:
        return
    from distil.storage import s3_errors

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
    from distil.run_setup import init_distributed, prepare
    from distil.train import Trainer

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
    trainer.checkpointer.install_signal_handler()
    result = trainer.train()
    if ctx.get_world_rank() == 0 and not result["stopped"]:
        from distil.metrics_log import summary_lines

        print("\n".join(summary_lines(result)), flush=True)


def launch(cfg: DistilConfig, start_over: bool = False) -> dict:
    """Validate on the driver, then train on Ray (a local Ray instance when no cluster is given).

    As for a local run (distil/cli.py `run_training`): everything that can be wrong with the
    input is found before anything of the run changes; then the driver takes the run's lease
    (distil/lease.py), which it holds for all of its workers until the run ends."""
    # Where relative paths in the config point, taken before Ray runs anything: a job's
    # `--working-dir` copy, the driver's cwd, can be cleaned up by Ray while the job runs.
    cwd = os.getcwd()
    cfg.check_before_loading(cfg.scaling.num_workers)  # (also for hub data, which only workers load)
    from distil import continuity
    from distil.quiet import quiet_libraries
    from distil.storage import check_storage_folder

    if not cfg.storage_root().is_s3:
        check_storage_folder(cfg.storage.uri)
    preflight(cfg)
    if not start_over:  # a refused or finished run says so before anything is loaded (read-only)
        finished = continuity.stored_resume_point(cfg, lambda m: print(m, flush=True))
        if finished:
            print(finished, flush=True)
            return {"checkpoint": None, "metrics": {}, "finished": True}
    quiet_libraries()
    import ray

    from distil.lease import RunLease
    from distil.model import load_teacher_config, validate_against_teacher
    from distil.prepared import ensure_prepared
    from distil.run_setup import check_precision, load_tokenizer

    validate_against_teacher(cfg, load_teacher_config(cfg))
    s = cfg.scaling
    check_precision(cfg, gpu=s.use_gpu)
    cfg.check_batch_split(s.num_workers)
    if not ray.is_initialized():
        # With its dashboard (~1 s more): Ray Train's placement-group cleaner asks the State API,
        # which the dashboard serves; without it the job's log gets a warning every second.
        ray.init(log_to_driver=True)
    # The data is prepared once, before any worker starts, by Ray Data tasks over the cluster's
    # CPUs (distil/prepared.py): workers open the prepared shards and never tokenize.
    data = ensure_prepared(cfg, load_tokenizer(cfg), cfg.train.micro_batch_size * s.num_workers,
                           log=lambda m: print(m, flush=True), use_ray=True)
    with RunLease(cfg.storage_root(), cfg.run_name(), log=lambda m: print(m, flush=True)):
        if start_over:
            continuity.start_over(cfg, lambda m: print(m, flush=True))
        else:  # again, now that no other process can change the run (it said what changed the first time)
            finished = continuity.stored_resume_point(cfg, lambda _m: None)
            if finished:
                print(finished, flush=True)
                return {"checkpoint": None, "metrics": {}, "finished": True}
        return _fit(cfg, data["fingerprint"], cwd)


def _fit(cfg: DistilConfig, fingerprint: str, cwd: str) -> dict:
    """The Ray Train run itself (the driver holds the run's lease)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    storage_path, filesystem = cfg.storage_root().arrow()
    # Ray Train sends a worker's print() both to its logger (stderr) and to stdout: every line of
    # the job's log would come twice. Our lines are plain prints; Ray passes this to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "prepared": fingerprint, "cwd": cwd},
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
    if where and not cfg.storage_root().is_s3:
        from distil.export import export_checkpoint

        model_dir = cfg.run_storage().local().resolve() / "model"  # the latest checkpoint's, also after a resume
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
