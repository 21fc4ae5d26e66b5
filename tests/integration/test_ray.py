"""The Ray entry point (jobs/distill.py) on a real local Ray instance, two CPU workers (gloo),
checkpoints in a real S3 endpoint (moto_server on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import torch

from tests.conftest import ROOT, base_config, write_config

pytestmark = pytest.mark.slow


def ray_job(config: Path, *overrides: str, wait=True, timeout=900):
    args = [sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    # A session of its own: killing the driver's group also kills the local Ray it started.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def keys(s3, bucket, prefix=""):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


@pytest.fixture()
def s3_run(tmp_path, teacher_dir, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    cfg = base_config(teacher_dir, tmp_path, storage={"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
                      scaling={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
                      train={"max_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 4},
                      checkpoint={"every_steps": 4, "keep_last": 2})
    return s3, bucket, cfg


def _fp32_weights(s3, bucket, prefix, dest: Path) -> dict:
    from distil.export import fp32_state_dict

    for key in keys(s3, bucket, prefix + "/"):
        if key.endswith("/"):  # directory markers written by pyarrow
            continue
        target = dest / key[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
    return fp32_state_dict(dest)


def test_two_workers_checkpoint_both_shards_to_s3(tmp_path, s3_run):
    s3, bucket, cfg = s3_run
    rc, out = ray_job(write_config(tmp_path / "c.yaml", cfg))
    assert rc == 0, out[-4000:]
    ckpts = sorted({k.split("/")[2] for k in keys(s3, bucket, "runs/t/") if k.split("/")[2].startswith("step_")})
    assert ckpts == ["step_00000008", "step_00000012"]  # keep_last 2
    last = keys(s3, bucket, "runs/t/step_00000012/")
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt", "COMPLETE", "config.yaml", "hf/config.json"):
        assert f"runs/t/step_00000012/{name}" in last, name
    state = s3.get_object(Bucket=bucket, Key="runs/t/step_00000012/trainer_state.json")["Body"].read()
    assert b'"world_size": 2' in state and b'"step": 12' in state
    config_text = s3.get_object(Bucket=bucket, Key="runs/t/step_00000012/config.yaml")["Body"].read().decode()
    assert "testing" not in config_text  # the credentials never reach a saved config


def test_bad_bucket_fails_before_workers_start(tmp_path, s3_run):
    s3, bucket, cfg = s3_run
    cfg["storage"]["uri"] = "s3://no-such-bucket-here/runs"
    rc, out = ray_job(write_config(tmp_path / "c.yaml", cfg))
    assert rc == 2 and "NoSuchBucket" in out and "Traceback" not in out, out[-3000:]
    assert "Started a local Ray instance" not in out


def test_driver_killed_then_rerun_resumes_bitwise(tmp_path, s3_run):
    s3, bucket, cfg = s3_run
    cfg["train"]["max_steps"] = 20
    ref_cfg = {**cfg, "storage": {**cfg["storage"], "uri": f"s3://{bucket}/ref"}}
    rc, out = ray_job(write_config(tmp_path / "ref.yaml", ref_cfg))
    assert rc == 0, out[-4000:]
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = ray_job(path, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # Once step 8 is uploaded, step 4 is registered for sure: a checkpoint reported moments
        # before a hard kill may never be (and must then not be resumed from).
        if "runs/t/step_00000008/COMPLETE" in keys(s3, bucket, "runs/t/step_00000008/"):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Whatever of that local Ray outlived its driver must not be joined by the rerun.
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
    done = [k for k in keys(s3, bucket, "runs/t/") if k.endswith("step_00000020/COMPLETE")]
    assert not done, "the driver must be killed before the run ends"
    rc, out = ray_job(path)
    assert rc == 0, out[-4000:]
    assert "resumed from step_00000004" in out or "resumed from step_00000008" in out or "resumed from step_00000012" in out
    ref = _fp32_weights(s3, bucket, "ref/t/step_00000020", tmp_path / "ref" / "step_00000020")
    got = _fp32_weights(s3, bucket, "runs/t/step_00000020", tmp_path / "got" / "step_00000020")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _worker_pids(driver_pid: int) -> list[int]:
    """Ray Train worker processes of the local Ray started by this driver (same session)."""
    sid = os.getsid(driver_pid)
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(l.split()[0]) for l in out.splitlines() if "RayTrainWorker" in l and int(l.split()[1]) == sid]


def test_lost_worker_restarts_the_group_from_the_latest_checkpoint(tmp_path, s3_run):
    s3, bucket, cfg = s3_run
    cfg["train"]["max_steps"] = 20
    proc = ray_job(write_config(tmp_path / "c.yaml", cfg), wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if "runs/t/step_00000008/COMPLETE" in keys(s3, bucket, "runs/t/step_00000008/"):
            break
        time.sleep(0.2)
    victims = _worker_pids(proc.pid)
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from step_0000000" in out
    state = s3.get_object(Bucket=bucket, Key="runs/t/step_00000020/trainer_state.json")["Body"].read()
    assert b'"step": 20' in state


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_and_ray_job_submit(tmp_path, s3_run):
    """Two Ray nodes on loopback (a head and a second `ray start --address`), one CPU each, so the
    two workers land on different nodes; the job goes in through `ray job submit`."""
    s3, bucket, cfg = s3_run
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    run = lambda *a, **kw: subprocess.run([ray, *a], env=env, capture_output=True, text=True, timeout=300, **kw)
    try:
        head = run("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                   f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1")
        assert head.returncode == 0, head.stderr[-2000:]
        second = run("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1")
        assert second.returncode == 0, second.stderr[-2000:]
        path = write_config(tmp_path / "c.yaml", cfg)
        job = run("job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
                  sys.executable, "jobs/distill.py", "--config", str(path), timeout=900)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "node_rank=1" in job.stdout, "the two workers must run on two nodes"
        last = keys(s3, bucket, "runs/t/step_00000012/")
        assert {"runs/t/step_00000012/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "runs/t/step_00000012/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(last)
    finally:
        run("stop", "--force")


def test_resume_with_fewer_workers_repartitions_zero_state(tmp_path, s3_run):
    """Spot capacity comes back smaller: two workers to step 8, then one worker to the end. The
    sampler counts global samples, so no batch is trained twice or skipped."""
    s3, bucket, cfg = s3_run
    cfg["train"]["max_steps"] = 8
    path = write_config(tmp_path / "c.yaml", cfg)
    rc, out = ray_job(path)
    assert rc == 0, out[-4000:]
    rc, out = ray_job(path, "train.max_steps=8", "scaling.num_workers=1", "checkpoint.every_steps=100")
    assert rc == 0 and "resumed from step_00000008" in out, out[-4000:]
    # Extend the same run: the schedule is part of the run's identity, so the name is fixed.
    cfg["train"]["max_steps"] = 12
    rc, out = ray_job(write_config(tmp_path / "c12.yaml", cfg), "scaling.num_workers=1")
    assert rc == 0 and "resumed from step_00000008" in out, out[-4000:]
    state = s3.get_object(Bucket=bucket, Key="runs/t/step_00000012/trainer_state.json")["Body"].read()
    assert b'"world_size": 1' in state and b'"step": 12' in state
    # 12 steps x 8 sequences: the sampler consumed exactly 96 global samples.
    assert b'"consumed": 96' in state
