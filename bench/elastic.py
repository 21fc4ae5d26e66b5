"""What a lost node costs an elastic run, and what it keeps against a fixed-size one (issue 28).

On a local cluster shaped like a KubeRay one (bench/local_cluster.py: a head with no CPU, two
1-CPU worker nodes; checkpoints in moto's S3), the same run twice -- elastic, `num_workers:
[1, 2]`, and fixed, `num_workers: 2`. Node b's raylet and workers are SIGKILLed (a spot VM
vanishing) as step 8's checkpoint is uploaded; it comes back `--return-after` seconds later. Every line of the job's
log is timestamped as it arrives, so the seconds from the loss to the next optimizer step split
into: Ray noticing the failure, the restart decision, the new worker group's start, the resume
(checkpoint fetched, re-partitioned, loaded) and the first step. Over the outage, the elastic
run trains on the worker that is left; the fixed one waits for the node.

    python -m bench.elastic [--return-after 120] [--window 60] [--start-timeout 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.drain import moto  # noqa: E402
from bench.local_cluster import LocalCluster  # noqa: E402
from bench.verify_hash import _cpu_model  # noqa: E402

STEP = re.compile(r"\bstep=(\d+) .*\bworkers=(\d+)")
DOWN = re.compile(r"resize: 2 -> 1 workers .*; down about (\d+) s \(the run's last sign of life: step (\d+)\)")
MARKS = {  # what a line of the log says, first seen after the loss
    "failure_seen": "Training failed due to worker errors",
    "group_start_tried": "Attempting to start training worker group",
    "group_started": "Started training worker group",
    "resumed": "resumed from step_",  # (absent when no checkpoint was registered yet: a start at 0)
}


def _config(work: Path, url: str, workers, steps: int, start_timeout: float) -> Path:
    """A small run whose log has a line per step (with its worker count), checkpoints every 4."""
    cfg = {
        "run": {"name": "elastic", "seed": 0},
        "teacher": {"name_or_path": str(_teacher(work))},
        "student": {"layers": [0, 2]},
        "data": {"sources": [str(ROOT / "data" / "brown" / "brown_sample.txt")], "max_len": 64},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "log_every": 1,
            "progress_bar": False,
        },
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "storage": {"uri": f"s3://elastic-{work.name.lower()}/runs", "endpoint_url": url},
        "scaling": {
            "num_workers": workers,
            "cpus_per_worker": 1,
            "max_failures": 5,
            "elastic_resize_interval_s": 5,
            "worker_group_start_timeout_s": start_timeout,
        },
    }
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _teacher(work: Path) -> Path:
    """A small random BertForMaskedLM with the all-MiniLM-L6-v2 WordPiece vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    dest = work / "teacher"
    if not dest.is_dir():
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(ROOT / "models" / "all-MiniLM-L6-v2")
        shape = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        BertForMaskedLM(BertConfig(vocab_size=len(tok), **shape)).save_pretrained(dest)
        tok.save_pretrained(dest)
    return dest


def one_run(work: Path, url: str, workers, return_after: float, window: float, start_timeout: float) -> dict:
    """The run with node b lost as step 8's checkpoint is uploaded and back `return_after` s later,
    observed until `window` s after the return: its timeline."""
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=f"elastic-{work.name.lower()}")
    cluster = LocalCluster()
    lines: list[tuple[float, str]] = []
    lost, lost_step, back = None, None, []
    comeback = None

    def come_back() -> None:
        cluster.add("node_b")
        back.append(time.monotonic())

    try:
        cluster.start("node_a", "node_b")
        proc = cluster.submit(_config(work, url, workers, steps=100_000, start_timeout=start_timeout))
        for line in proc.stdout:
            now = time.monotonic()
            lines.append((now, line))
            if lost is None and re.search(r"\bstep=8 checkpoint/save_s=", line):  # (as the test does)
                cluster.lose("node_b")
                lost, lost_step = time.monotonic(), 8
                comeback = threading.Timer(return_after, come_back)  # (a fixed run may log nothing meanwhile)
                comeback.start()
            if back and now > back[0] + window:
                break
        if comeback is not None:
            comeback.join()
    finally:
        cluster.stop()
        proc.kill()
    (work / "job.log").write_text("".join(line for _, line in lines))
    if not back:
        raise SystemExit(f"the run ended before node b came back: see {work / 'job.log'}")
    return _timeline(lines, lost, lost_step, back[0])


def _timeline(lines: list[tuple[float, str]], lost: float, lost_step: int, back: float) -> dict:
    """Seconds after the loss at which each mark first shows, the first step of the group started
    after the failure (lines of the dying group, printed late, come before it), and the step the
    run had reached at the node's return and at the end of the window."""
    after = [(t, line) for t, line in lines if t > lost]
    marks = {}
    for name, text in MARKS.items():
        found = next((t for t, line in after if text in line and t >= (marks.get("failure_seen") or 0) + lost), None)
        marks[name] = None if found is None else round(found - lost, 1)
    started = lost + (marks["group_started"] or 0)
    steps = [(t, int(m.group(1)), int(m.group(2))) for t, line in after if (m := STEP.search(line)) and t > started]
    first = steps[0] if steps else None
    regrown = next(((t, s) for t, s, w in steps if t > back and w == 2), None)
    reached = [s for t, s, _ in steps if t <= back]
    # What the run itself says of the gap (its heartbeat, distil/runs/heartbeat.py), to compare
    # with the seconds measured here from the loss.
    said = next((m for _, line in after if (m := DOWN.search(line))), None)
    return {
        "step_at_loss": lost_step,
        "marks_s_after_loss": marks,
        "loss_to_next_step_s": None if first is None else round(first[0] - lost, 1),
        "next_step": None if first is None else {"step": first[1], "workers": first[2]},
        "node_back_s_after_loss": round(back - lost, 1),
        "resize_line": None if said is None else {"down_s": int(said.group(1)), "last_sign_step": int(said.group(2))},
        "step_reached_at_return": max(reached, default=None),
        "return_to_two_worker_step_s": None if regrown is None else round(regrown[0] - back, 1),
        "step_reached_at_window_end": max((s for _, s, _ in steps), default=None),
        "window_s_after_return": round(lines[-1][0] - back, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--return-after", type=float, default=120.0, help="seconds until node b comes back")
    p.add_argument("--window", type=float, default=60.0, help="seconds observed after the node's return")
    p.add_argument("--start-timeout", type=float, default=60.0, help="scaling.worker_group_start_timeout_s")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    import ray
    import torch

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    root = Path(tempfile.mkdtemp(prefix="distil-elastic-"))
    server, url = moto(root / "moto.log")
    results = {}
    try:
        for name, workers in (("elastic", [1, 2]), ("fixed", 2)):
            work = root / name
            work.mkdir()
            results[name] = one_run(work, url, workers, a.return_after, a.window, a.start_timeout)
    finally:
        server.terminate()
    report = {
        "bench": "elastic",
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "return_after_s": a.return_after,
        "worker_group_start_timeout_s": a.start_timeout,
        **results,
    }
    print(json.dumps(report, indent=1))
    for name in results:  # the job logs, for where the seconds went
        shutil.copy(root / name / "job.log", Path(tempfile.gettempdir()) / f"distil-bench-elastic-{name}.log")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
