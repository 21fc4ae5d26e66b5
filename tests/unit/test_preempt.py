"""The preStop hook (python -m distil.runs.preempt) and the worker's side of it, without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT


def hook(env: dict, timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil.runs.preempt", "--timeout", timeout],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=60,
    )


def test_hook_returns_once_the_checkpoint_is_acknowledged(tmp_path, monkeypatch):
    from distil.runs import preempt

    marker = tmp_path / "preempt"
    monkeypatch.setenv("DISTIL_PREEMPT_FILE", str(marker))
    monkeypatch.setenv("DISTIL_PREEMPT_WAIT", "0")

    def worker():  # what Trainer.train does after each step
        while not preempt.requested():
            time.sleep(0.05)
        preempt.wait_out(17)

    t = threading.Thread(target=worker)
    t.start()
    r = hook({"DISTIL_PREEMPT_FILE": str(marker)}, "30")
    t.join(10)
    assert r.returncode == 0 and "checkpoint at step 17 persisted" in r.stdout
    assert not marker.exists()  # a cancelled drain (nothing killed the worker) does not trigger again


def test_hook_never_blocks_beyond_its_timeout(tmp_path):
    t0 = time.monotonic()
    r = hook({"DISTIL_PREEMPT_FILE": str(tmp_path / "preempt")}, "1")
    assert r.returncode == 0 and "no checkpoint acknowledged" in r.stderr
    assert time.monotonic() - t0 < 30


def _acknowledge_many(n: int) -> None:
    from distil.runs import preempt

    for _ in range(n):
        preempt.acknowledge(5)


def test_ranks_of_one_pod_acknowledge_at_once(tmp_path, monkeypatch):
    """A pod with several GPUs runs several ranks, sharing /tmp: after the barrier that ends a
    checkpoint they all acknowledge at the same moment (this raced and failed a Ray worker)."""
    import multiprocessing

    from distil.runs import preempt

    monkeypatch.setenv("DISTIL_PREEMPT_FILE", str(tmp_path / "preempt"))
    procs = [multiprocessing.get_context("fork").Process(target=_acknowledge_many, args=(300,)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    assert preempt.done_marker().read_text() == "5" and sorted(f.name for f in tmp_path.iterdir()) == ["preempt.done"]
