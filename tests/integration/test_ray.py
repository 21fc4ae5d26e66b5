"""The Ray entry point (jobs/distill.py) on a real local Ray instance, two CPU workers (gloo),
checkpoints in a real S3 endpoint (moto_server on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import torch

from tests.conftest import ROOT, base_config, write_config

pytestmark = pytest.mark.slow


def ray_job(config: Path, *overrides: str, wait=True, timeout=900, extra_env: dict | None = None, cwd: Path = ROOT):
    args = [sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    # RAY_ADDRESS=local: a Ray instance of its own, even if one outlived an earlier test.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0", "RAY_ADDRESS": "local", **(extra_env or {})}
    # A session of its own: killing the driver's group also kills the local Ray it started.
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True
    )
    _started.append(proc)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """A test that fails half-way must not leave its run (and its local Ray) to the next test."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            kill_driver(proc)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and its session, then stop whatever of its local Ray outlived it (it must
    not be joined by a rerun)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def killed_run(s3, bucket, path: Path, kill_after: str) -> None:
    """The run of config `path` (storage under s3://bucket/runs), its driver killed once checkpoint
    `kill_after` is registered."""
    proc = ray_job(path, wait=False)
    wait_registered(s3, bucket, "runs/t", kill_after, proc)
    kill_driver(proc)


def keys(s3, bucket, prefix=""):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def _run_config(tmp_path, teacher_dir, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    cfg = base_config(
        teacher_dir,
        tmp_path,
        storage={"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        train={"max_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 4},
        checkpoint={"every_steps": 4, "keep_last": 2},
    )
    return s3, bucket, cfg


@pytest.fixture()
def s3_run(tmp_path, teacher_dir, s3_endpoint):
    return _run_config(tmp_path, teacher_dir, s3_endpoint)


@pytest.fixture(scope="module")
def reference_20(tmp_path_factory, teacher_dir, s3_endpoint):
    """One uninterrupted 20-step run (two workers), under s3://bucket/ref/t: what every interrupted
    run of the same config must end equal to. (config, bucket); made once for the tests that
    compare with it: a run is over a minute here."""
    tmp = tmp_path_factory.mktemp("reference_20")
    s3, bucket, cfg = _run_config(tmp, teacher_dir, s3_endpoint)
    cfg["train"]["max_steps"] = 20
    ref_cfg = {**cfg, "storage": {**cfg["storage"], "uri": f"s3://{bucket}/ref"}}
    rc, out = ray_job(write_config(tmp / "ref.yaml", ref_cfg))
    assert rc == 0, out[-4000:]
    return cfg, bucket


def _same_run_as(reference_20, s3_run, tmp_path) -> Path:
    """The reference's config with this test's bucket (s3://bucket/runs), written to a file."""
    _, bucket, own = s3_run
    cfg = {
        **reference_20[0],
        "storage": own["storage"],
        "data": {**reference_20[0]["data"], "cache_dir": own["data"]["cache_dir"]},
    }
    return write_config(tmp_path / "c.yaml", cfg)


def wait_registered(s3, bucket, run_prefix: str, tag: str, proc, timeout=600) -> None:
    """Until Ray has *registered* checkpoint `tag` (its checkpoint manager snapshot names it):
    an uploaded checkpoint not yet registered is, by design, not resumed from."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            snap = s3.get_object(Bucket=bucket, Key=f"{run_prefix}/checkpoint_manager_snapshot.json")["Body"].read()
            if tag.encode() in snap:
                return
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{tag} was never registered (run ended: {proc.poll() is not None})")


def _fp32_weights(s3, bucket, prefix, dest: Path) -> dict:
    from distil.runs.export import fp32_state_dict

    for key in keys(s3, bucket, prefix + "/"):
        if key.endswith("/"):  # directory markers written by pyarrow
            continue
        target = dest / key[len(prefix) + 1 :]
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
    for name in (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "rank_00000.pt",
        "rank_00001.pt",
        "COMPLETE",
        "config.yaml",
        "hf/config.json",
    ):
        assert f"runs/t/step_00000012/{name}" in last, name
    state = s3.get_object(Bucket=bucket, Key="runs/t/step_00000012/trainer_state.json")["Body"].read()
    assert b'"world_size": 2' in state and b'"step": 12' in state
    config_text = s3.get_object(Bucket=bucket, Key="runs/t/step_00000012/config.yaml")["Body"].read().decode()
    assert "testing" not in config_text  # the credentials never reach a saved config
    # The run's history, published beside its checkpoints by rank 0.
    run_keys = keys(s3, bucket, "runs/t/")
    assert "runs/t/metrics.jsonl" in run_keys and any(k.startswith("runs/t/tensorboard/events.out") for k in run_keys)
    # Ray's layout (RUN/step_N) listed and pulled: the fp32 weights merged from both ranks' shards.
    endpoint = cfg["storage"]["endpoint_url"]
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "distil.cli",
            "checkpoints",
            "list",
            f"s3://{bucket}/runs",
            "--json",
            "--endpoint-url",
            endpoint,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    rows = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(r["run"], r["step"], r["complete"], r["world_size"]) for r in rows] == [
        ("t", 8, True, 2),
        ("t", 12, True, 2),
    ]
    pulled = subprocess.run(
        [
            sys.executable,
            "-m",
            "distil.cli",
            "checkpoints",
            "pull",
            f"s3://{bucket}/runs/t",
            "--out",
            str(tmp_path / "model"),
            "--endpoint-url",
            endpoint,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "model").state_dict()
    merged = _fp32_weights(s3, bucket, "runs/t/step_00000012", tmp_path / "direct" / "step_00000012")
    assert all(torch.equal(model[k], v) for k, v in merged.items())
    _finished_changed_and_damaged(tmp_path, s3, bucket, cfg)


def test_local_storage_with_relative_paths_and_a_resume_that_re_exports(tmp_path, teacher_dir):
    """The README's local journey: paths relative to where the command runs (Ray Train runs the
    workers elsewhere), checkpoints, metrics and TensorBoard events in a local folder, and a run
    resumed with more steps whose `model/` is the new last checkpoint's, not the first run's."""
    from transformers import AutoModelForMaskedLM

    from distil.runs.export import fp32_state_dict
    from tests.conftest import EN_TEXT

    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    (work / "models" / "teacher").symlink_to(teacher_dir)
    (work / "data").mkdir()
    (work / "data" / "corpus.txt").write_text(EN_TEXT.read_text())
    cfg = base_config(
        teacher_dir,
        tmp_path,
        teacher={"name_or_path": "./models/teacher"},
        data={"sources": ["data/corpus.txt"], "cache_dir": "cache"},
        storage={"uri": "runs"},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 2},
        checkpoint={"every_steps": 4, "keep_last": 2},
    )
    write_config(work / "c.yaml", cfg)
    run = work / "runs" / "t"
    weights = {}
    for steps in (4, 8):
        rc, out = ray_job(Path("c.yaml"), f"train.max_steps={steps}", cwd=work)
        assert rc == 0, out[-4000:]
        # the job's log: each line once (Ray Train once sent every print to stdout and stderr),
        # a line per logged step, and the end summary
        lines = [re.sub(r"^\S*\(RayTrainWorker pid=\d+\)\S* ", "", x) for x in out.splitlines()]
        assert sum(x.startswith(f"done: step {steps}, ") for x in lines) == 1, out[-4000:]
        assert sum(x.startswith(f"step={steps} ") and "train/loss=" in x for x in lines) == 1, out[-4000:]
        assert "Failed to query Ray Train Controller actor state" not in out  # (once a line a second)
        assert (run / "metrics.jsonl").is_file() and list((run / "tensorboard").glob("events.out.tfevents.*"))
        weights[steps] = AutoModelForMaskedLM.from_pretrained(run / "model").state_dict()
        merged = fp32_state_dict(run / f"step_{steps:08d}")
        assert all(torch.equal(weights[steps][k], v) for k, v in merged.items()), f"model/ is not step {steps}'s"
    assert not all(torch.equal(weights[4][k], weights[8][k]) for k in weights[8])
    assert not list(run.glob(".model.*"))  # the swap left nothing behind


def _etags(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def _finished_changed_and_damaged(tmp_path, s3, bucket, cfg):
    """Issue 14 on the Ray path, on the finished 12-step run: asked again it changes nothing;
    with another lr it is refused before Ray starts; with its newest checkpoint damaged in S3
    and more steps, the workers name it and resume from the older intact one."""
    path = write_config(tmp_path / "c.yaml", cfg)
    before = _etags(s3, bucket, "runs/t/")
    rc, out = ray_job(path)
    assert rc == 0 and "already finished" in out and "Started a local Ray instance" not in out, out[-3000:]
    rc, out = ray_job(path, "optim.lr=0.01")
    assert rc == 2 and "optim.lr: 0.001 -> 0.01" in out and "Traceback" not in out, out[-3000:]
    assert "Started a local Ray instance" not in out and _etags(s3, bucket, "runs/t/") == before
    rc, out = ray_job(path, "checkpoint.resume=false")
    assert rc == 2 and "--start-over" in out and "Started a local Ray instance" not in out, out[-3000:]
    key = "runs/t/step_00000012/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[1000:1064] = bytes(b ^ 0xFF for b in body[1000:1064])
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    rc, out = ray_job(path, "train.max_steps=16")
    assert rc == 0, out[-4000:]
    assert "step_00000012 is damaged" in out and "zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256" in out, out[-4000:]
    assert "resumed from step_00000008" in out, out[-4000:]
    state = json.loads(s3.get_object(Bucket=bucket, Key="runs/t/step_00000016/trainer_state.json")["Body"].read())
    assert state["step"] == 16
    # Step 12 was trained again and saved beside the damaged folder (which Ray then pruned, by its
    # path): keep_last 2 leaves the second save of 12 and 16, whole.
    folders = {k.split("/")[2] for k in keys(s3, bucket, "runs/t/") if k.split("/")[2].startswith("step_")}
    assert folders == {"step_00000012.1", "step_00000016"}, folders
    state = json.loads(s3.get_object(Bucket=bucket, Key="runs/t/step_00000012.1/trainer_state.json")["Body"].read())
    assert state["step"] == 12


def test_bad_bucket_fails_before_workers_start(tmp_path, s3_run):
    s3, bucket, cfg = s3_run
    cfg["storage"]["uri"] = "s3://no-such-bucket-here/runs"
    rc, out = ray_job(write_config(tmp_path / "c.yaml", cfg))
    assert rc == 2 and "NoSuchBucket" in out and "Traceback" not in out, out[-3000:]
    assert "Started a local Ray instance" not in out


def test_driver_killed_then_rerun_resumes_bitwise(tmp_path, s3_run, reference_20):
    s3, bucket, _ = s3_run
    path = _same_run_as(reference_20, s3_run, tmp_path)
    killed_run(s3, bucket, path, "step_00000008")
    done = [k for k in keys(s3, bucket, "runs/t/") if k.endswith("step_00000020/COMPLETE")]
    assert not done, "the driver must be killed before the run ends"
    assert "runs/.leases/t.json" in keys(s3, bucket, "runs/.leases/")  # the killed driver's lease (issue 27)
    rc, out = ray_job(path)
    assert rc == 0, out[-4000:]
    assert re.search(r"run t: took over the lease of host \S+, pid \d+, .*which is gone", out), out[-4000:]
    assert re.search(r"resumed from step_000000(08|12|16)", out), out[-4000:]
    assert "runs/.leases/t.json" not in keys(s3, bucket, "runs/.leases/")  # released at the end
    ref = _fp32_weights(s3, reference_20[1], "ref/t/step_00000020", tmp_path / "ref" / "step_00000020")
    got = _fp32_weights(s3, bucket, "runs/t/step_00000020", tmp_path / "got" / "step_00000020")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _worker_pids(driver_pid: int) -> list[int]:
    """Ray Train worker processes of the local Ray started by this driver (same session)."""
    sid = os.getsid(driver_pid)
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [
        int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and int(line.split()[1]) == sid
    ]


def test_pod_drain_checkpoints_then_the_group_restarts_from_it(tmp_path, s3_run):
    """A worker pod's preStop hook (python -m distil.runs.preempt, as the chart installs it) mid-run:
    the workers finish the step in flight, checkpoint and acknowledge; then the pod goes (its
    workers are killed) and Ray restarts the group from that checkpoint. Only the drain and the
    end write checkpoints here, so resuming from it proves it was the drain's. (Workers lost
    without a drain, their node with them, and the group going on from the latest registered
    checkpoint: tests/integration/test_elastic.py.)"""
    s3, bucket, cfg = s3_run
    cfg["train"]["max_steps"] = 20
    cfg["checkpoint"]["every_steps"] = 1000
    marker = tmp_path / "distil-preempt"
    env = {"DISTIL_PREEMPT_FILE": str(marker), "DISTIL_PREEMPT_WAIT": "600"}
    proc = ray_job(write_config(tmp_path / "c.yaml", cfg), wait=False, extra_env=env)
    hook = subprocess.run(
        [sys.executable, "-m", "distil.runs.preempt", "--timeout", "400"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=500,
    )
    m = re.search(r"checkpoint at step (\d+) persisted", hook.stdout)
    assert m, hook.stdout + hook.stderr
    step = int(m.group(1))
    assert 1 <= step < 20
    # "Persisted" means every rank's upload is done, not just that of the rank which answered.
    uploaded = set(keys(s3, bucket, f"runs/t/step_{step:08d}/"))
    assert {
        f"runs/t/step_{step:08d}/{n}"
        for n in ("COMPLETE", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    } <= uploaded
    wait_registered(s3, bucket, "runs/t", f"step_{step:08d}", proc)
    marker.unlink()  # the pod's /tmp goes with it
    victims = _worker_pids(proc.pid)
    assert len(victims) == 2, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from step_{step:08d}" in out, out[-4000:]
    state = s3.get_object(Bucket=bucket, Key="runs/t/step_00000020/trainer_state.json")["Body"].read()
    assert b'"step": 20' in state


def test_preempted_then_resumed_on_fewer_workers(tmp_path, s3_run, reference_20):
    """Spot capacity comes back smaller: a 2-worker run is killed, the same command with one
    worker resumes from the latest registered checkpoint, its ZeRO-2 state re-partitioned, and
    trains every remaining global batch once (same token count as an uninterrupted run)."""
    s3, bucket, _ = s3_run
    path = _same_run_as(reference_20, s3_run, tmp_path)
    killed_run(s3, bucket, path, "step_00000004")
    rc, out = ray_job(path, "scaling.num_workers=1")
    assert rc == 0, out[-4000:]
    m = re.search(
        r"resumed from step_000000(04|08|12|16) .*written by 2 workers, ZeRO-2 state re-partitioned for 1", out
    )
    assert m, out[-4000:]

    def read(bucket, prefix, name):
        return json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/step_00000020/{name}")["Body"].read())

    got, ref = read(bucket, "runs/t", "trainer_state.json"), read(reference_20[1], "ref/t", "trainer_state.json")
    assert got["world_size"] == 1 and got["step"] == 20
    assert (got["tokens"], got["sampler"]) == (ref["tokens"], ref["sampler"])
    # One rank's shard and RNG state now; the rest of the checkpoint as before.
    assert sorted(read(bucket, "runs/t", "COMPLETE")["files"]) == sorted(
        k for k in read(reference_20[1], "ref/t", "COMPLETE")["files"] if "rank_1_" not in k and k != "rank_00001.pt"
    )


class CuttableProxy:
    """A loopback TCP proxy in front of the S3 endpoint. `cut()` plays an object store that goes
    away: open connections are reset and new ones are reset on arrival (and counted, so a test
    can tell that the outage was actually hit); `restore()` brings it back."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.refused, self.is_cut = upstream_port, 0, False
        self._conns: list = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True
            for c in self._conns:
                self._reset(c)
            self._conns.clear()

    def restore(self) -> None:
        with self._lock:
            self.is_cut = False

    def _reset(self, sock) -> None:
        with contextlib.suppress(OSError):  # linger 0: close sends RST, as a vanished host's network does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with self._lock:
                if self.is_cut:
                    self.refused += 1
                    self._reset(client)
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            with contextlib.suppress(OSError):  # the other side went, or the proxy was cut
                while data := src.recv(65536):
                    dst.sendall(data)
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_s3_outage_during_uploads_training_goes_on_and_the_run_ends_complete(tmp_path, s3_run, s3_endpoint):
    """The object store unreachable from step 3, well before the step-10 checkpoint, until step
    15 (or 30 s): uploads are asynchronous, so the workers hand the checkpoint over and train
    steps 11.. while its upload retries with backoff (storage.max_attempts; a synchronous upload
    held them until the store came back); the step-20 checkpoint waits for it; the run
    completes, and nothing incomplete is resumed. (The cut waits for a step's log line, which
    reaches this test late: cut at step 9, the step-10 upload was sometimes done before it.)"""
    s3, bucket, cfg = s3_run
    proxy = CuttableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    cfg["storage"]["endpoint_url"] = f"http://127.0.0.1:{proxy.port}"
    cfg["train"].update(max_steps=20, log_every=1)
    cfg["checkpoint"].update(every_steps=10, keep_last=20)  # keep every checkpoint, to check the ones resumed from
    proc = ray_job(write_config(tmp_path / "c.yaml", cfg), wait=False)
    lines, trained_while_cut = [], []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"step=(\d+) .*train/loss=", line)
        if m and int(m.group(1)) == 3 and not proxy.is_cut:
            proxy.cut()
            cut_at = time.monotonic()
        elif m and proxy.is_cut:
            trained_while_cut.append(int(m.group(1)))
            if int(m.group(1)) >= 15 or time.monotonic() - cut_at > 30:
                proxy.restore()
        elif proxy.is_cut and time.monotonic() - cut_at > 30:
            proxy.restore()
    proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    assert proxy.refused > 0, "no request reached the store during the outage: the test proved nothing"
    assert {11, 12, 13, 14, 15} <= set(trained_while_cut), (trained_while_cut, out[-3000:])
    assert (
        json.loads(s3.get_object(Bucket=bucket, Key="runs/t/step_00000020/trainer_state.json")["Body"].read())["step"]
        == 20
    )
    assert "runs/t/step_00000010/COMPLETE" in keys(s3, bucket, "runs/t/step_00000010/")
    # Every checkpoint a worker group resumed from (if the outage outlasted the retries) was complete.
    for tag in re.findall(r"resumed from (step_\d{8})", out):
        assert f"runs/t/{tag}/COMPLETE" in keys(s3, bucket, f"runs/t/{tag}/")
