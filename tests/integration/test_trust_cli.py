"""Issue 14 through the real command line: hostile keys and links in checkpoints, damaged
checkpoints on resume and export, one run per name, and bad input -- each one message, exit
code 2, no traceback, nothing written. S3 is moto_server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from safetensors.torch import load_file

from distil.runs import layout as ckpt
from distil.storage import integrity
from tests.conftest import EN_TEXT, ROOT, base_config, fake_checkpoint, write_config

pytestmark = pytest.mark.slow


def distil(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )


def refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one `distil: error:` line naming what is wrong, a fix, no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("distil: error:")].__len__() == 1, r.stderr
    assert "fix:" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def tree(path: Path) -> dict[str, bytes]:
    return (
        {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.exists()
        else {}
    )


# -- the path rule: pull never writes, reads through a link or deletes outside its folders -----


def _manifested(files: dict[str, bytes]) -> dict[str, bytes]:
    import hashlib

    manifest = {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()}
    return {**files, ckpt.COMPLETE: json.dumps({"step": 1, "world_size": 1, "tokens": 1, "files": manifest}).encode()}


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_pull_refuses_object_keys_that_leave_the_cache(tmp_path, s3_endpoint, escape):
    """A key whose run part is absolute or holds '..' once made pull write there and then
    rmtree that place (a local run's checkpoint folder was deleted this way, exit 0)."""
    victim = tmp_path / "victim"
    (victim / "step_00000001").mkdir(parents=True)
    (victim / "step_00000001" / "precious.pt").write_bytes(b"do not delete")
    before = tree(tmp_path / "victim")
    cache, out = tmp_path / "cache", tmp_path / "out"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"hostile-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    # The key's run part points at the victim: from the cache folder (bucket/...) or absolutely.
    run_part = str(victim) if escape == "absolute" else "../" * (len(cache.parts) + 1) + str(victim).lstrip("/")
    for name, body in _manifested({"model.pt": b"attacker bytes"}).items():
        s3.put_object(Bucket=bucket, Key=f"{run_part}/step_00000001/{name}", Body=body)
    assert any(o["Key"].startswith(run_part) for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    r = distil(
        "checkpoints",
        "pull",
        f"s3://{bucket}",
        "--out",
        str(out),
        "--raw",
        "--cache-dir",
        str(cache),
        "--endpoint-url",
        s3_endpoint,
    )
    refused(r, "object key", "step_00000001")
    assert tree(tmp_path / "victim") == before
    assert not out.exists() and not any(f.is_file() for f in cache.rglob("*"))


def test_local_pull_copies_no_link_target(tmp_path):
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"PRIVATE KEY")
    run = tmp_path / "runs" / "r"
    d = fake_checkpoint(run, "step_00000001", {"model.pt": b"weights"})
    (d / "extra").symlink_to(secret.parent)  # a link beside the manifest's files: never followed
    r = distil("checkpoints", "pull", str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "raw"), "--raw")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "raw") == {"model.pt": b"weights", "COMPLETE": (d / "COMPLETE").read_bytes()}
    # A file of the manifest that is a link (hash and size made to match the target): refused.
    (d / "model.pt").unlink()
    shutil.copy(d / ckpt.COMPLETE, tmp_path / "complete")
    manifest = json.loads((d / ckpt.COMPLETE).read_text())
    manifest["files"]["model.pt"] = {"size": len(b"PRIVATE KEY"), "sha256": integrity.sha256_file(secret)}
    (d / ckpt.COMPLETE).write_text(json.dumps(manifest))
    (d / "model.pt").symlink_to(secret)
    r = distil("checkpoints", "pull", str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "raw2"), "--raw")
    refused(r, "symbolic link")
    assert not (tmp_path / "raw2").exists()


# -- damaged checkpoints: resume falls back, export refuses ------------------------------------


@pytest.fixture(scope="module")
def trained(trained_run):
    """A finished 6-step run (checkpoints at 3 and 6) and its exported weights."""
    cfg, run = trained_run
    return cfg, run, load_file(str(run / "model" / "model.safetensors"))


def _copy_run(trained, tmp_path: Path) -> tuple[Path, Path]:
    cfg, run, _ = trained
    dest = tmp_path / "runs" / "t"
    shutil.copytree(run, dest, symlinks=True)
    return write_config(tmp_path / "c.yaml", {**cfg, "storage": {"uri": str(tmp_path / "runs")}}), dest


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, trained):
    """64 flipped bytes in the newest optimizer shard once resumed silently (different weights,
    exit 0). Now: named, passed over, and the run retrains from step 3 to the same weights."""
    path, run = _copy_run(trained, tmp_path)
    shard = run / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip(shard)
    shutil.rmtree(run / "model")
    r = distil("train", "--config", str(path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "step_00000006 is damaged" in r.stderr and "sha256" in r.stderr
    assert "resumed from step_00000003" in r.stdout
    weights, reference = load_file(str(run / "model" / "model.safetensors")), trained[2]
    assert weights.keys() == reference.keys() and all(bool((weights[k] == reference[k]).all()) for k in reference)
    assert ckpt.damage(run / "step_00000006") is None  # saved again, whole


def test_export_prints_its_json_alone_and_the_trained_weights(tmp_path, trained):
    """A script reads `distil export`'s stdout as JSON: DeepSpeed's log lines go to stderr."""
    _, run, reference = trained
    r = distil("export", str(run / "step_00000006"), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout) == {"model_dir": str(tmp_path / "m")}
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert weights.keys() == reference.keys() and all(bool((weights[k] == reference[k]).all()) for k in reference)


def test_export_refuses_a_flipped_model_file(tmp_path, trained):
    _, run = _copy_run(trained, tmp_path)
    _flip(run / "step_00000006" / "mp_rank_00_model_states.pt")
    r = distil("export", str(run / "step_00000006"), "--out", str(tmp_path / "m"))
    refused(r, "mp_rank_00_model_states.pt: sha256 differs")
    assert not (tmp_path / "m").exists()


def test_edited_trainer_state_is_not_resumed(tmp_path, trained):
    """An edited step in trainer_state.json once skipped steps; now the checkpoint is damaged."""
    path, run = _copy_run(trained, tmp_path)
    for tag in ("step_00000003", "step_00000006"):
        state = run / tag / ckpt.TRAINER_STATE
        state.write_text(state.read_text().replace('"step": ', '"step": 2'))
    before = tree(run)
    r = distil("train", "--config", str(path), "--set", "train.max_steps=40")
    refused(r, "every checkpoint of the run", "trainer_state.json")
    assert tree(run) == before


# -- a run is one run ------------------------------------------------------------------------


def test_finished_run_with_a_changed_value_is_refused_and_unchanged_run_says_finished(tmp_path, trained):
    path, run = _copy_run(trained, tmp_path)
    before = tree(run)
    r = distil("train", "--config", str(path), "--set", "optim.lr=5e-4")
    refused(r, "optim.lr: 0.001 -> 0.0005", "run.name")
    assert tree(run) == before
    r = distil("train", "--config", str(path))
    assert r.returncode == 0 and "already finished" in r.stdout and "step 6" in r.stdout, r.stdout + r.stderr
    assert tree(run) == before


def test_fresh_start_over_a_run_is_refused_unless_started_over(tmp_path, trained):
    path, run = _copy_run(trained, tmp_path)
    before = tree(run)
    r = distil("train", "--config", str(path), "--set", "checkpoint.resume=false")
    refused(r, "checkpoint.resume", "step_00000006", "--start-over")
    assert tree(run) == before
    r = distil("train", "--config", str(path), "--set", "checkpoint.resume=false", "--start-over")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    moved = [p for p in run.parent.iterdir() if p.name.startswith("t.replaced-")]
    assert len(moved) == 1 and tree(moved[0]) == before  # the old run, whole, beside the new one
    assert ckpt.complete_tags(run) == ["step_00000003", "step_00000006"]
    assert (run / "latest").read_text() == "step_00000006"


# -- bad input: one message, exit 2, nothing written ------------------------------------------


def _corpus(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.txt"
    p.write_bytes(
        {
            "empty": b"",
            "binary": bytes(range(256)) * 64,
            "latin-1": "Zażółć gęślą jaźń, café\n".encode("latin-1", "replace") * 50 + "caf\xe9\n".encode("latin-1"),
        }[kind]
    )
    return p


@pytest.mark.parametrize("kind", ["empty", "binary", "latin-1"])
def test_corpus_that_cannot_be_read(tmp_path, teacher_dir, kind):
    cfg = base_config(teacher_dir, tmp_path, data={"sources": [str(_corpus(tmp_path, kind))]})
    r = distil("train", "--config", str(write_config(tmp_path / "c.yaml", cfg)))
    refused(r, "data.sources")
    assert not (tmp_path / "runs").exists()


def test_truncated_teacher_weights(tmp_path, teacher_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    cfg = base_config(teacher, tmp_path)
    r = distil("train", "--config", str(write_config(tmp_path / "c.yaml", cfg)))
    refused(r, "teacher.name_or_path", "weights")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["not utf-8", "betas", "lr inf", "temperature nan", "storage is a file"])
def test_config_values(tmp_path, teacher_dir, case):
    cfg = base_config(teacher_dir, tmp_path)
    path = write_config(tmp_path / "c.yaml", cfg)
    overrides = {
        "betas": ["optim.betas=[0.9, 1.5]"],
        "lr inf": ["optim.lr=.inf"],
        "temperature nan": ["loss.temperature=.nan"],
        "storage is a file": [f"storage.uri={tmp_path / 'afile'}"],
    }.get(case, [])
    if case == "not utf-8":
        path.write_bytes(path.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    (tmp_path / "afile").write_text("x")
    args = ["train", "--config", str(path)] + [a for o in overrides for a in ("--set", o)]
    refused(
        distil(*args),
        {
            "not utf-8": "UTF-8",
            "betas": "optim",
            "lr inf": "optim.lr",
            "temperature nan": "loss.temperature",
            "storage is a file": "storage.uri",
        }[case],
    )
    assert not (tmp_path / "runs").exists()


def test_command_flags(tmp_path, trained):
    run = trained[1]
    refused(distil("checkpoints", "list", "s3://b/x", "--endpoint-url", "notaurl"), "--endpoint-url")
    refused(
        distil("checkpoints", "list", "s3://b/x", "--endpoint-url", "http://ak:SECRETKEY@minio:9000"), "credentials"
    )
    assert (
        "SECRETKEY"
        not in distil("checkpoints", "list", "s3://b/x", "--endpoint-url", "http://ak:SECRETKEY@minio:9000").stderr
    )
    refused(
        distil(
            "checkpoints",
            "pull",
            "s3://b/x",
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
            "--endpoint-url",
            "http://127.0.0.1:9",
        ),
        "--workers",
    )
    (tmp_path / "afile").write_text("x")
    refused(
        distil(
            "checkpoints",
            "pull",
            "s3://b/x",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "afile" / "c"),
            "--endpoint-url",
            "http://127.0.0.1:9",
        ),
        "--cache-dir",
    )
    assert not (tmp_path / "o").exists()
    # distil plot on a malformed metrics.jsonl: the rows that are its own are drawn
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "metrics.jsonl").write_bytes(
        b'[1, 2]\n"x"\n{"step": "a", "lr": 1}\n\xff\xfe\n{"step": 2, "lr": 0.5}\n{"step": 4, "lr": 0.25}\n'
    )
    r = distil("plot", str(bad), "--out", str(tmp_path / "p.png"))
    assert r.returncode == 0 and "lr" in r.stdout and (tmp_path / "p.png").stat().st_size > 0, r.stderr
    (bad / "metrics.jsonl").write_text("[1, 2]\n")
    refused(distil("plot", str(bad), "--out", str(tmp_path / "q.png")), "no metrics")
    # distil eval from another folder: the run's relative teacher path is named, --teacher is the fix
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    saved = yaml.safe_load((model / "distil_config.yaml").read_text())
    saved["teacher"]["name_or_path"] = "./models/teacher"
    (model / "distil_config.yaml").write_text(yaml.safe_dump(saved))
    refused(distil("eval", str(model), cwd=tmp_path), "./models/teacher", "--teacher")


def test_start_over_on_s3_moves_every_object_aside(tmp_path, s3_endpoint):
    """S3 has no rename: every object of the run is copied under RUN.replaced-<time>, then deleted."""
    from distil.config.schema import DistilConfig
    from distil.runs import continuity

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"over-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    objects = {f"runs/t/step_0000000{i}/f{j}": os.urandom(100 + j) for i in (4, 8) for j in range(3)}
    objects |= {"runs/t/metrics.jsonl": b"{}\n", "runs/t2/keep": b"another run", "runs/t-old": b"a sibling file"}
    for k, v in objects.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    cfg = DistilConfig.model_validate(
        {
            "run": {"name": "t"},
            "teacher": {"name_or_path": "x"},
            "student": {"layers": [0]},
            "data": {"sources": [str(EN_TEXT)]},
            "train": {"max_steps": 1},
            "storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
        }
    )
    said: list[str] = []
    continuity.start_over(cfg, said.append)
    after = {
        o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
    }
    moved = {k for k in after if k.startswith("runs/t.replaced-")}
    prefix = next(iter(moved)).split("/")[1]
    assert {k.replace(f"runs/{prefix}/", "runs/t/") for k in moved} == {k for k in objects if k.startswith("runs/t/")}
    assert all(after[k] == objects[k.replace(f"runs/{prefix}/", "runs/t/")] for k in moved)
    assert not any(k.startswith("runs/t/") for k in after)
    assert after["runs/t2/keep"] == b"another run" and after["runs/t-old"] == b"a sibling file"
    assert prefix in said[0]


def test_export_refuses_shards_its_manifest_does_not_list(tmp_path, trained):
    """DeepSpeed's merge globs *_optim_states.pt: a leftover shard of an unfinished save (another
    worker count) would be merged in."""
    _, run = _copy_run(trained, tmp_path)
    ck = run / "step_00000006"
    shutil.copy(ck / "zero_pp_rank_0_mp_rank_00_optim_states.pt", ck / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    r = distil("export", str(ck), "--out", str(tmp_path / "m"))
    refused(r, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "manifest does not list")
    assert not (tmp_path / "m").exists()
