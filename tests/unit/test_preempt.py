"""The preStop hook (python -m distil.preempt) and the worker's side of it, without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT


def hook(env: dict, timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distil.preempt", "--timeout", timeout], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=60)


def test_hook_returns_once_the_checkpoint_is_acknowledged(tmp_path, monkeypatch):
    from distil import preempt

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
