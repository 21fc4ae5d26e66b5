"""The run's metrics: RUN/metrics.jsonl (one JSON object per row) and TensorBoard events in
RUN/tensorboard, both written by rank 0 only.

A row is {"step": N, "train/loss": ..., "lr": ..., ...}. After a resume the rows past the
resumed step are history that never happened (the steps are trained again), so they are
dropped from metrics.jsonl and TensorBoard is told to purge them (`purge_step`).
"""

from __future__ import annotations

# Imports inside functions: TensorBoard's writer only when train.tensorboard is on.
import json
import shutil
from pathlib import Path

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_rows(path: Path) -> list[dict]:
    return parse_rows(Path(path).read_text())


def parse_rows(text: str) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is ignored."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):  # anything else is not one of ours
            rows.append(row)
    return rows


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, echo=None):
        """enabled: this is rank 0; echo: a function that prints a row (None: quiet)."""
        self.run_dir, self.enabled, self.tensorboard, self.echo = Path(run_dir), enabled, tensorboard, echo
        self._writer = None

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS

    def _tb(self, purge_step: int | None = None):
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD), purge_step=purge_step, flush_secs=30)
        return self._writer

    def write(self, row: dict) -> None:
        if not self.enabled or len(row) <= 1:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._tb()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])
        if self.echo is not None:
            self.echo(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def resumed_at(self, step: int, saved: Path | None) -> None:
        """Continue the history of a run resumed at `step`; `saved` is the checkpoint's copy of it,
        used when this worker's folder has none (a new Ray worker)."""
        if not self.enabled:
            return
        if not self.path.is_file() and saved is not None and saved.is_file():
            shutil.copy(saved, self.path)
        if self.path.is_file():
            kept = [r for r in read_rows(self.path) if r.get("step", 0) <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._tb(purge_step=step + 1)

    def first_eval(self) -> dict[str, float]:
        """The held-out metrics of step 0 from this run's history ({} on other ranks, or none)."""
        if not (self.enabled and self.path.is_file()):
            return {}
        for row in read_rows(self.path):
            if row.get("step") == 0 and any(k.startswith("eval/") for k in row):
                return {k: v for k, v in row.items() if k != "step"}
        return {}

    def snapshot_into(self, ckpt_dir: Path) -> None:
        """A copy in the checkpoint, so that a run in object storage keeps its history."""
        if self.enabled and self.path.is_file():
            shutil.copy(self.path, ckpt_dir / METRICS)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def summary_lines(result: dict) -> list[str]:
    """The end of a run, for its log: where it got to, what this start cost (wall time, mean
    throughput), where the model is, and the held-out figures before and after training."""
    start, end = result["start"], result["end"]
    wall = round(result["wall_s"], 1)  # (rounded first: 59.96 s is 1:00.0, not 0:60.0)
    planned = result.get("planned_steps")
    lines = [
        f"done: step {result['step']}, {result['tokens']:,} tokens"
        + (" (the steps its time budget planned)" if planned is not None and planned == result["step"] else "")
        + (f"; model in {result['model_dir']}" if result.get("model_dir") else ""),
        f"  this start: {result['steps_run']} steps in {int(wall // 3600)}:{int(wall % 3600 // 60):02d}:{wall % 60:04.1f} "
        f"(h:mm:ss), {result['tokens_per_s']:,.0f} tokens/s mean",
    ]
    if result.get("resizes"):
        lines.append("  resizes: " + resize_text(result["resizes"]))
    for key in sorted(end):
        group, _, metric = key.partition("/")  # eval/ (held-out), eval_<name>/ (eval.sources), probe/
        if metric.endswith("rows"):  # (a count: in the model card)
            continue
        name = f"{'held-out' if group == 'eval' else group.removeprefix('eval_')} {metric}"
        arrow = "(higher is better)" if metric == "agreement" or group == "probe" else ""
        lines.append(f"  {name:27s} start {start.get(key, float('nan')):.4f} -> end {end[key]:.4f} {arrow}".rstrip())
    return lines


def resize_text(resizes: list[dict]) -> str:
    """'4 -> 2 workers at step 120, 2 -> 4 at step 300' (an elastic run's starts on another count)."""
    return ", ".join(
        f"{r['from']} -> {r['to']}{' workers' if i == 0 else ''} at step {r['step']}" for i, r in enumerate(resizes)
    )
