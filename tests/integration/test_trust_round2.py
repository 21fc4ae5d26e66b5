"""Issue 27 through the real command line: a credential planted in any URI a config or a flag
takes appears nowhere; --start-over validates everything before it moves the run; one process
trains a run at a time; the newer flags' bad values are one message. S3 is moto_server."""

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

from tests.conftest import ROOT, base_config, write_config
from tests.integration.test_trust_cli import distil, refused, tree

pytestmark = pytest.mark.slow

CANARY = "CANARY0c7f3e"


def _files(path: Path) -> dict[str, bytes]:
    return tree(path)


@pytest.fixture()
def in_process(capfd):
    """`distil ARGS` in this process (the same `main()`, without a Python start-up a call: these
    commands are refused before anything loads): a CompletedProcess, as `distil()` gives."""
    from distil.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


@pytest.fixture()
def canary_world(tmp_path, teacher_dir):
    config = write_config(tmp_path / "c.yaml", base_config(teacher_dir, tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    return tmp_path, config, model


def test_a_credential_in_any_uri_appears_nowhere(canary_world, in_process):
    """Every URI the config or a flag takes: refused with the place named, exit 2, the secret in
    no output and no file (a dry-run ConfigMap included: nothing is rendered)."""
    tmp_path, config, model = canary_world
    c = str(config)
    cases = [
        (("config", "-c", c, "--set", f"storage.uri=s3://AKIA:{CANARY}@bucket/runs"), "storage.uri"),
        (("config", "-c", c, "--set", f"data.sources=[https://user:{CANARY}@host/corpus.txt]"), "data.sources.0"),
        (("train", "-c", c, "--set", f"teacher.name_or_path=https://user:{CANARY}@host/bert"), "teacher.name_or_path"),
        (
            (
                "train",
                "-c",
                c,
                "--set",
                "data.sources=[json]",
                "--set",
                f"data.hub_kwargs={{data_files: 'https://host/x.jsonl?token={CANARY}'}}",
            ),
            "data.hub_kwargs.data_files",
        ),
        (("train", "-c", c, "--set", f"eval.sources=[s3://AK:{CANARY}@b/ood.txt]"), "eval.sources.0"),
        (("train", "-c", c, "--set", f"eval.probe.path=https://h/p.tsv?X-Amz-Signature={CANARY}"), "eval.probe.path"),
        (("train", "--ray", "-c", c, "--set", f"storage.uri=s3://AK:{CANARY}@b/runs"), "storage.uri"),
        (("prepare", "-c", c, "--set", f"storage.uri=s3://AK:{CANARY}@b/runs"), "storage.uri"),
        (
            (
                "k8s",
                "submit",
                "-c",
                c,
                "--image",
                "img:1",
                "--dry-run",
                "--set",
                f"storage.uri=s3://AK:{CANARY}@b/runs",
            ),
            "storage.uri",
        ),
        (("checkpoints", "list", f"s3://AK:{CANARY}@bucket/runs"), "storage URI"),
        (("checkpoints", "pull", f"s3://AK:{CANARY}@bucket/runs/t", "--out", str(tmp_path / "out")), "storage URI"),
        (("plot", f"s3://AK:{CANARY}@bucket/runs/t", "--out", str(tmp_path / "p.png")), "storage URI"),
        (("eval", str(model), "--teacher", f"https://u:{CANARY}@host/bert", "--data", "x.txt"), "--teacher"),
        (("eval", str(model), "--teacher", "t", "--data", f"s3://AK:{CANARY}@b/x.txt"), "--data"),
        (("eval", str(model), "--probe", f"https://host/p.tsv?token={CANARY}"), "--probe"),
    ]
    before = _files(tmp_path)
    for args, where in cases:
        r = in_process(*args)
        refused(r, where, "credentials")
        assert CANARY not in r.stdout + r.stderr, args
    assert _files(tmp_path) == before  # nothing written anywhere, the runs folder not even made
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "distill.py"),
            "--config",
            c,
            "--set",
            f"data.sources=[s3://AK:{CANARY}@b/c/]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    refused(r, "data.sources.0")
    assert CANARY not in r.stdout + r.stderr and _files(tmp_path) == before


def test_flags_out_of_range_are_one_message(canary_world, in_process):
    """distil eval's counts, and the integers `distil k8s submit` writes into Kubernetes objects
    (int32 replicas and backoffLimit, an int64 grace period that wrapped to -9223372036854775808)."""
    tmp_path, config, model = canary_world
    for flag, value in (
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--max-sequences", "-5"),
        ("--max-sequences", "0"),
    ):
        refused(in_process("eval", str(model), flag, value), flag, "1 or more")
    submit = ("k8s", "submit", "-c", str(config), "--image", "img:1", "--dry-run", "--set", "storage.uri=s3://b/runs")
    refused(
        in_process(*submit, "--grace-period", "100000000000000000000"),
        "--grace-period",
        "more than the Kubernetes field holds",
    )
    refused(in_process(*submit, "--workers", str(2**31)), "--workers", "2,147,483,647")
    refused(in_process(*submit, "--backoff-limit", str(2**31)), "--backoff-limit")
    for flag in ("--cpu", "--memory", "--shm-size"):
        refused(in_process(*submit, flag, "..."), flag, "not a Kubernetes quantity")


# -- --start-over validates before it moves anything -------------------------------------------


def _copy_run(trained_run, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    cfg, run = trained_run
    dest = tmp_path / "runs" / "t"
    shutil.copytree(run, dest, symlinks=True)
    data = run.parent / "data"
    shutil.copytree(data, tmp_path / "runs" / "data", symlinks=True)  # the prepared data too: no re-tokenizing
    return write_config(tmp_path / "c.yaml", {**cfg, "storage": {"uri": str(tmp_path / "runs")}}), dest


def test_start_over_with_a_bad_override_moves_nothing(tmp_path, trained_run, in_process):
    """Issue 27: --start-over renamed the run to RUN.replaced-... and then refused the override:
    the user's run was gone from where they left it. Each bad value is refused first now, local
    and with --ray, and the run stays whole where it was."""
    path, run = _copy_run(trained_run, tmp_path)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    before = tree(run)
    for ray, override, where in [
        (False, "student.layers=[0,9]", "student.layers"),
        (False, "data.max_len=1000", "data.max_len"),
        (False, "precision.dtype=fp16", "precision.dtype"),
        (False, f"data.sources=[{binary}]", "data.sources"),
        (True, "precision.dtype=fp16", "precision.dtype"),
        (True, "student.layers=[0,9]", "student.layers"),
    ]:
        r = in_process("train", *(["--ray"] if ray else []), "--config", str(path), "--set", override, "--start-over")
        refused(r, where)
        assert tree(run) == before and sorted(p.name for p in run.parent.iterdir()) == ["data", "t"], (ray, override)


def test_start_over_on_s3_with_a_bad_override_moves_nothing(tmp_path, teacher_dir, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"over-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    objects = {f"runs/t/step_00000004/f{j}": os.urandom(50) for j in range(3)}
    for k, v in objects.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    cfg = base_config(teacher_dir, tmp_path, storage={"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint})
    path = write_config(tmp_path / "c.yaml", cfg)
    for override, where in (("student.layers=[0,9]", "student.layers"), ("precision.dtype=fp16", "precision.dtype")):
        refused(distil("train", "--ray", "--config", str(path), "--set", override, "--start-over"), where)
        after = {
            o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
        }
        assert after == objects


# -- one process trains a run at a time --------------------------------------------------------


def test_a_running_run_is_refused_to_a_second_start_and_to_start_over(tmp_path, teacher_dir):
    """Issue 27: two `distil train` of one config both trained, their steps interleaved in one
    metrics.jsonl, and --start-over moved a running run away under it (a traceback). Now the
    second start and --start-over are refused naming the holder; once the holder is killed
    (SIGKILL: its lease stays behind), the next start takes the lease over."""
    cfg = base_config(
        teacher_dir,
        tmp_path,
        train={
            "max_steps": 100000,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "log_every": 10,
            "progress_bar": False,
        },
        checkpoint={"every_steps": 100000, "keep_last": 2},
    )
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "distil.cli", "train", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lease = tmp_path / "runs" / ".leases" / "t.json"
        deadline = time.monotonic() + 300
        while not (lease.is_file() and (tmp_path / "runs" / "t" / "metrics.jsonl").is_file()):
            assert first.poll() is None and time.monotonic() < deadline, (
                first.stdout.read() if first.poll() is not None else "slow"
            )
            time.sleep(0.2)
        second = distil("train", "--config", str(path))
        refused(second, "run t is in use", f"pid {first.pid}", "another run.name")
        over = distil("train", "--config", str(path), "--start-over")
        refused(over, "run t is in use", f"pid {first.pid}")
        assert first.poll() is None, "the running run goes on"
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".leases", "data", "t"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lease.is_file()  # SIGKILL: never released
    r = distil("train", "--config", str(path), "--start-over", "--set", "train.max_steps=6")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (
        f"took over the lease of host {os.uname().nodename}, pid {first.pid}" in r.stderr
        and "which is gone" in r.stderr
    )
    assert not lease.exists() and not lease.parent.exists()  # released at the end
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("t.replaced-")]


def test_distil_check_reaches_the_storage_and_leaves_nothing(tmp_path, teacher_dir, s3_endpoint):
    """`distil check` (what the chart's `helm test` pod runs): the config validated and a marker
    written, read and deleted in the run's storage; a missing bucket or an unwritable folder is
    one message."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"check-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    cfg = base_config(teacher_dir, tmp_path, storage={"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint})
    path = write_config(tmp_path / "c.yaml", cfg)
    r = distil("check", "--config", str(path))
    assert r.returncode == 0 and f"run t: the config is valid and s3://{bucket}/runs can be written" in r.stdout, (
        r.stderr
    )
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # the marker is gone
    refused(
        distil("check", "--config", str(path), "--set", "storage.uri=s3://no-such-bucket-here/runs"), "NoSuchBucket"
    )
    (tmp_path / "afile").write_text("x")
    refused(
        distil("check", "--config", str(path), "--set", f"storage.uri={tmp_path / 'afile' / 'runs'}"),
        "storage.uri",
        "is a file",
    )
