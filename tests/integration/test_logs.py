"""What a run prints where no terminal is attached (a pod's log, a CI job): plain lines that
say how it is going, never a progress bar redrawn with carriage returns."""

from __future__ import annotations

import re

import pytest

from distil.runs.metrics_log import read_rows

pytestmark = pytest.mark.slow  # it reads the log of the session's trained run (tests/conftest.py)


def test_a_run_without_a_terminal_logs_plain_lines(trained_run):
    cfg, run = trained_run
    log = (run.parent.parent / "train.log").read_text()
    assert "\r" not in log  # no progress bar: train.progress_bar is on, but there is no terminal
    lines = log.splitlines()
    rows = [r for r in read_rows(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]  # log_every 2
    for row in rows:  # one line per logged step, every figure of the row in it
        [line] = [x for x in lines if x.startswith(f"step={row['step']} ") and "train/loss=" in x]
        for key in ("train/loss", "train/kl", "train/mlm", "train/cos", "lr", "grad_norm", "tokens_per_s", "eta_s"):
            assert re.search(rf"(^| ){re.escape(key)}=[-0-9.e+]+( |$)", line), (key, line)
    assert [float(re.search(r"eta_s=(\S+)", x).group(1)) == 0 for x in lines if "train/loss=" in x][-1]
    saves = [x for x in lines if "checkpoint/save_s=" in x]
    assert [int(x.split()[0].removeprefix("step=")) for x in saves] == [3, 6]  # checkpoint.every_steps 3
    assert all(re.search(r"checkpoint/save_s=[0-9.e+-]+ checkpoint/upload_s=", x) for x in saves)
    done = lines.index(next(x for x in lines if x.startswith("done: step 6, ")))
    m = re.fullmatch(
        r"  this start: 6 steps in 0:(\d\d):(\d\d\.\d) \(h:mm:ss\), ([0-9,]+) tokens/s mean", lines[done + 1]
    )
    assert m and float(m.group(3).replace(",", "")) > 0, lines[done + 1]
    probe = [r for r in read_rows(run / "metrics.jsonl") if "probe/retention_accuracy" in r]
    assert [r["step"] for r in probe] == [0, 6]  # the untrained cut, then the student
    end = probe[-1]
    assert end["probe/retention_accuracy"] == pytest.approx(
        end["probe/student_accuracy"] / end["probe/teacher_accuracy"]
    )
    assert (
        f"  {'probe retention_accuracy':27s} start {probe[0]['probe/retention_accuracy']:.4f} -> end "
        f"{end['probe/retention_accuracy']:.4f} (higher is better)" in lines
    )
