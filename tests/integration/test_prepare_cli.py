"""`distil prepare` through the real command line: it prepares once and says so, a later
prepare or run opens what is there; a preparation killed with SIGKILL leaves nothing that is
read, and the next one completes (and clears what the dead one left); a damaged or
incomplete folder is prepared again; bad corpora are one message, exit 2, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distil.data import shards as ts
from tests.conftest import EN_TEXT, ROOT, base_config, write_config

pytestmark = pytest.mark.slow


def distil(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env()
    )


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _config(tmp_path: Path, teacher_dir: Path, source: Path) -> Path:
    cfg = base_config(teacher_dir, tmp_path)
    cfg["data"]["sources"] = [str(source)]
    return write_config(tmp_path / "run.yaml", cfg)


def test_killed_preparation_is_never_read_and_the_next_completes(tmp_path, teacher_dir):
    big = tmp_path / "corpus"
    big.mkdir()
    for i in range(60):  # 60 files, ~6 MB: seconds to prepare in one process, written as it goes
        (big / f"{i:02d}.txt").write_text(EN_TEXT.read_text())
    config = _config(tmp_path, teacher_dir, big)
    data = tmp_path / "runs" / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distil.cli", "prepare", "--config", str(config), "--in-process"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(data.glob("*.partial-*/train_00000.tokens")):  # killed in the middle of writing
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "slow"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = data.iterdir()
    assert ".partial-" in partial.name and not (partial / ts.MANIFEST).exists()

    r = distil("prepare", "--config", str(config), "--in-process")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preparing the data once" in r.stdout
    (folder,) = data.iterdir()  # the dead writer's folder is gone
    store = ts.PreparedData(folder, check="full")  # every file whole, sha256 and contents checked
    assert store.manifest["splits"]["train"]["sequences"] > 10000

    again = distil("prepare", "--config", str(config))
    assert again.returncode == 0 and "preparing" not in again.stdout, again.stdout + again.stderr
    assert f"in {folder}" in again.stdout
    assert [p.name for p in data.iterdir()] == [folder.name]

    # Issue 27: `distil prepare` reported a damaged folder healthy, and a folder whose manifest
    # was deleted made every later start fail with `OSError: Directory not empty`.
    shard = folder / "train_00000.tokens"
    shard.write_bytes(bytes(shard.stat().st_size))  # zero-filled: sizes as the manifest says
    r = distil("prepare", "--config", str(config), "--in-process")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train_00000.tokens: sha256 differs from the manifest; preparing it again" in r.stdout, r.stdout
    assert ts.PreparedData(folder, check="full").manifest == store.manifest
    (folder / ts.MANIFEST).unlink()
    r = distil("prepare", "--config", str(config), "--in-process")
    assert r.returncode == 0 and "holds no MANIFEST.json" in r.stdout, r.stdout + r.stderr
    assert ts.PreparedData(folder, check="full").manifest == store.manifest
    assert [p.name for p in data.iterdir()] == [folder.name]


@pytest.mark.parametrize(
    "content,needle", [(b"\n  \n\n", "hold no text"), (b"ok\ncaf\xe9\n", "is not UTF-8 text (byte 6")]
)
def test_bad_corpora_are_refused_and_nothing_written(tmp_path, teacher_dir, content, needle):
    source = tmp_path / "corpus.txt"
    source.write_bytes(content)
    r = distil("prepare", "--config", str(_config(tmp_path, teacher_dir, source)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert needle in r.stderr and len([x for x in r.stderr.splitlines() if x.startswith("distil: error:")]) == 1, (
        r.stderr
    )
    assert not (tmp_path / "runs").exists()
