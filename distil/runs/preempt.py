"""Checkpoint-on-preemption for Ray workers on Kubernetes: a pod's preStop hook.

Ray runs the training loop off the main thread, so a worker cannot catch SIGTERM itself (and
SIGTERM reaches `ray start`, not the worker). Kubernetes runs a container's preStop hook
*before* it sends SIGTERM, inside the same grace period, so the chart's worker pods run

    python -m distil.runs.preempt --timeout SECONDS

which leaves a marker file in the pod's /tmp and waits. Every rank checks for the marker after
each optimizer step (an all-reduce, so all ranks act together): they finish the step in flight,
write a checkpoint through ray.train.report, acknowledge, and wait. The hook returns once the
checkpoint is acknowledged, the pod goes, and Ray restarts the worker group from that
checkpoint: at most the step in flight is lost, when the grace period covers one step and one
checkpoint upload.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def marker() -> Path:
    return Path(os.environ.get("DISTIL_PREEMPT_FILE", "/tmp/distil-preempt"))


def done_marker() -> Path:
    return marker().with_name(marker().name + ".done")


def requested() -> bool:
    return marker().exists()


def acknowledge(step: int) -> None:
    """The checkpoint of `step` is persisted: the preStop hook may return."""
    # One name per process: several ranks of a pod (one per GPU) acknowledge at the same moment.
    tmp = done_marker().with_name(f"{done_marker().name}.tmp.{os.getpid()}")
    tmp.write_text(str(step))
    os.replace(tmp, done_marker())


def wait_out(step: int, log=None) -> None:
    """After the drain checkpoint: acknowledge it, then idle until the pod goes and Ray restarts
    the group from it. If nothing ends this worker within DISTIL_PREEMPT_WAIT seconds (the drain
    was cancelled), return so that training goes on."""
    mine = requested()
    if mine:
        acknowledge(step)
    if log is not None:
        log(f"pod drain: checkpoint at step {step} persisted; waiting for the pod to go")
    deadline = time.monotonic() + float(os.environ.get("DISTIL_PREEMPT_WAIT", "900"))
    while time.monotonic() < deadline:
        time.sleep(1.0)
    if mine:
        marker().unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distil.runs.preempt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--timeout", type=float, default=240.0, help="seconds to wait for the checkpoint (keep under the grace period)"
    )
    args = p.parse_args(argv)
    done_marker().unlink(missing_ok=True)
    marker().parent.mkdir(parents=True, exist_ok=True)
    marker().write_text(str(time.time()))
    start = time.monotonic()
    deadline = start + args.timeout
    while time.monotonic() < deadline:
        if done_marker().exists():
            print(
                f"distil: checkpoint at step {done_marker().read_text().strip()} persisted before shutdown, "
                f"{time.monotonic() - start:.1f}s after the drain began",
                flush=True,
            )
            return 0
        time.sleep(0.5)
    print(
        f"distil: no checkpoint acknowledged within {args.timeout:.0f}s; shutting down anyway",
        file=sys.stderr,
        flush=True,
    )
    return 0  # never block the pod's termination beyond the grace period


if __name__ == "__main__":
    sys.exit(main())
