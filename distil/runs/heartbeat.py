"""The run's last sign of life: `STORAGE/RUN/heartbeat.json`, the step rank 0 last finished and
when, written at the first step of every start and then every `EVERY_S` seconds.

Why: a worker group that starts again (a node lost, an elastic resize, a resubmitted job) resumes
from a checkpoint, and the checkpoint says when *it* was saved -- not when the group before it
last trained. After an announced preemption that is the same moment; after a node that vanished
without notice the old group may have trained for minutes past its last checkpoint. The
heartbeat says how long the run trained nothing and which steps it trains again, to within
`EVERY_S` and a step (the resize and resume lines, distil/runs/checkpointer.py).

A heartbeat is never a reason to wait or to fail: it is written on a thread of its own, skipped
while the last write is still going (storage slow or unreachable), and one that cannot be read is
no heartbeat.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

HEARTBEAT = "heartbeat.json"
EVERY_S = 2.0  # at most an S3 PUT every 2 s of training (43,200 a day: ~$0.22 at AWS S3 prices): the gap known to ~2 s


@dataclass(frozen=True)
class Gap:
    """Between the run's last sign of life and a start that resumes it."""

    last_step: int  # the last step known trained (the checkpoint's, or a later heartbeat's): the
    # run may have trained up to EVERY_S (and a step) past it
    seconds: float  # since then, until this start
    retrained: int  # steps after the resumed checkpoint trained before and trained again now

    def text(self) -> str:
        again = (
            f"steps {self.last_step - self.retrained + 1}-{self.last_step} are trained again"
            if self.retrained
            else "the checkpoint's"
        )
        return f"the run's last sign of life: step {self.last_step}, {self.seconds:.0f} s ago ({again})"


def gap(beat: dict | None, resumed_step: int, saved_at: float | None, now: float) -> Gap | None:
    """The gap before a start that resumes `resumed_step` (saved at `saved_at`, epoch s), from the
    stored heartbeat (`beat`: {"step", "at"}, or None); None when nothing says when the run last
    trained. A heartbeat older than the checkpoint (the last beat came before its step) leaves
    the checkpoint as the last sign of life."""
    signs = [(resumed_step, saved_at)] if saved_at is not None else []
    if beat is not None and beat["step"] >= resumed_step:
        signs.append((beat["step"], beat["at"]))
    if not signs:
        return None
    step = max(s for s, _ in signs)
    at = max(a for _, a in signs)  # (a drain saves its step after that step's beat: the later time)
    return Gap(last_step=step, seconds=max(0.0, now - at), retrained=step - resumed_step)


class Heartbeat:
    """Rank 0's heartbeat in the run's storage (`storage`: a distil.storage.location.Storage);
    `enabled` False (other ranks) makes every call a no-op."""

    def __init__(self, storage, enabled: bool, every_s: float = EVERY_S, clock=time.time):
        self.storage, self.enabled, self.every_s, self.clock = storage, enabled, every_s, clock
        self._sent_at: float | None = None
        self._writing: threading.Thread | None = None

    def last(self) -> dict | None:
        """The heartbeat the run stored before this start ({"step", "at", "workers"}), or None."""
        if not self.enabled:
            return None
        try:
            record = json.loads(self.storage.read_bytes(HEARTBEAT))
            return {"step": int(record["step"]), "at": float(record["at"]), "workers": int(record["workers"])}
        except Exception:  # missing, unreadable or not ours: no heartbeat (never a failed start)
            return None

    def beat(self, step: int, workers: int) -> None:
        """After an optimizer step: store this step and the time, at the first step of this start
        and then every `every_s` seconds, unless the last write is still going."""
        if not self.enabled:
            return
        now = self.clock()
        if self._sent_at is not None and now - self._sent_at < self.every_s:
            return
        if self._writing is not None and self._writing.is_alive():
            return
        self._sent_at = now
        record = {
            "step": step,
            "at": now,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "workers": workers,
        }
        # A daemon thread: a write stuck on an unreachable endpoint must not hold the process's exit.
        self._writing = threading.Thread(target=self._write, args=(json.dumps(record).encode(),), daemon=True)
        self._writing.start()

    def _write(self, body: bytes) -> None:
        try:
            self.storage.write_bytes(HEARTBEAT, body)
        except Exception:  # storage away: the next beat tries again
            pass

    def wait(self, timeout: float | None = None) -> None:
        """Until the write in flight, if any, is done (tests; the end of a run does not wait)."""
        if self._writing is not None:
            self._writing.join(timeout)
