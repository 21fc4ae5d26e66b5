"""`distil plot`: a run's metrics over steps as one PNG (loss terms, held-out terms, lr, tokens/s).

Reads RUN/metrics.jsonl from a local run folder or from object storage; when a run folder has
none (an older Ray run), the copy in its newest checkpoint.
"""

from __future__ import annotations

# Imports inside functions: matplotlib only for `distil plot`.
from pathlib import Path

from distil.errors import UserError
from distil.runs.catalog import list_checkpoints
from distil.runs.metrics_log import METRICS, parse_rows
from distil.storage.location import Storage


def load_rows(uri: str, endpoint_url: str | None = None, region: str | None = None) -> list[dict]:
    storage = Storage(uri, endpoint_url, region)
    objects = storage.list_objects()
    if METRICS not in {o["key"] for o in objects}:
        candidates = [c for c in list_checkpoints(storage, objects) if METRICS in c.objects]
        if not candidates:
            raise UserError(
                f"no {METRICS} under {uri}", fix="give a run folder or s3://.../RUN (see `distil checkpoints list`)"
            )
        if len({c.run for c in candidates}) > 1:
            raise UserError(f"{uri} holds several runs", fix="name one: URI/RUN")
        key = candidates[-1].objects[METRICS]["key"]
    else:
        key = METRICS
    return parse_rows(storage.read_bytes(key).decode("utf-8", "replace"))


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)}; a later row for the same step and metric wins."""
    last: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                last.setdefault(k, {})[r["step"]] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in last.items()}


PANELS = (
    ("training loss terms", lambda k: k.startswith("train/")),
    ("held-out", lambda k: k.startswith("eval/")),
    ("learning rate", lambda k: k == "lr"),
    ("tokens/s", lambda k: k == "tokens_per_s"),
)


def plot(
    uri: str, out: Path, endpoint_url: str | None = None, region: str | None = None, title: str | None = None
) -> list[str]:
    """Draw the panels that have data; returns the metric names drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(load_rows(uri, endpoint_url, region))
    panels = [(name, sorted(k for k in data if pick(k))) for name, pick in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        raise UserError(f"{uri} has no metrics to plot yet", fix="plot again after the first log_every steps")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], panels):
        for k in keys:
            steps, values = data[k]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=k.split("/", 1)[-1])
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8, ncol=min(4, len(keys)))
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or uri, fontsize=11)
    fig.tight_layout()
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return [k for _, keys in panels for k in keys]
