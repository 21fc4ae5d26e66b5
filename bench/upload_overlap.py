"""Step time while a checkpoint uploads (issue 16): Ray workers hand each checkpoint to Ray's
upload thread (`checkpoint_upload_mode=ASYNC`) and go on training; how much slower is a step
during an upload than a step without one?

Runs `jobs/distill.py` on the demo (all-MiniLM-L6-v2 teacher, 3-layer student: ~200 MB of
checkpoint with the optimizer states) with two Ray Train workers, storage in S3 (moto_server on
loopback), a metrics row every step and a checkpoint every `--every` steps. A step's time is
its row's tokens / tokens_per_s. "During an upload": the `--window` steps after each periodic
checkpoint (the upload of ~200 MB to moto takes longer than that here); "normal": the
`--window` steps before it. Also reports `checkpoint/upload_s`, the seconds training was held.
Target: during ÷ normal ≤ 1.2.

    .venv/bin/python bench/upload_overlap.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import PY, ROOT, _env, machine, start_moto  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of the run")
    ap.add_argument("--every", type=int, default=15, help="checkpoint every N steps")
    ap.add_argument("--window", type=int, default=4, help="steps compared before and after each checkpoint")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray Train workers (1 CPU and 1 torch thread each); with fewer "
        "workers than cores, the upload and the store get a core of their own, "
        "as on a GPU node",
    )
    ap.add_argument("--work", default="/tmp/distil-upload-overlap", help="moto's log and scratch")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    moto, endpoint = start_moto(work)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    prefix = f"overlap-{time.monotonic_ns()}"
    sets = [
        f"storage.uri=s3://bench/{prefix}",
        f"storage.endpoint_url={endpoint}",
        f"scaling.num_workers={a.workers}",
        "scaling.cpus_per_worker=1",
        f"train.micro_batch_size={64 // a.workers}",
        f"train.max_steps={a.steps}",
        "train.log_every=1",
        f"checkpoint.every_steps={a.every}",
        f"checkpoint.keep_last={a.steps // a.every + 1}",
        "train.progress_bar=false",
        "eval.sources=[]",
        "eval.probe.path=null",
    ]  # the demo's extra measures: not what this bench times
    args = [
        PY,
        str(ROOT / "jobs" / "distill.py"),
        "--config",
        "configs/demo.yaml",
        *[x for s in sets for x in ("--set", s)],
    ]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=_env(RAY_ADDRESS="local"))
    moto_rows = s3.get_object(Bucket="bench", Key=f"{prefix}/demo/metrics.jsonl")["Body"].read().decode()
    moto.terminate()
    if r.returncode:
        raise SystemExit(r.stdout[-4000:] + r.stderr[-4000:])
    rows = [json.loads(x) for x in moto_rows.splitlines()]
    train = {x["step"]: x for x in rows if "tokens_per_s" in x}
    saves = {x["step"]: x for x in rows if "checkpoint/save_s" in x}
    # A row's window runs from the previous row: the step's tokens over tokens/s, less the
    # checkpoint saved between the two rows (its save and the time training was held).
    step_s = {
        k: (x["tokens"] - train[k - 1]["tokens"]) / x["tokens_per_s"]
        - sum(saves.get(k - 1, {}).get(f"checkpoint/{w}_s", 0.0) for w in ("save", "upload"))
        for k, x in train.items()
        if k - 1 in train
    }
    held = [x["checkpoint/upload_s"] for x in saves.values()]
    before, after = [], []
    for k in range(a.every, a.steps, a.every):  # the periodic checkpoints before the last step
        before += [step_s[s] for s in range(k - a.window + 1, k + 1) if s in step_s]
        after += [step_s[s] for s in range(k + 1, k + a.window + 1) if s in step_s]
    out = {
        "machine": machine(),
        "command": "bench/upload_overlap.py " + " ".join(argv or sys.argv[1:]),
        "workers": a.workers,
        "normal_step_s": statistics.median(before),
        "step_during_upload_s": statistics.median(after),
        "steps_before": before,
        "steps_after": after,
        "held_for_upload_s": held,
        "save_s": [x["checkpoint/save_s"] for x in saves.values()],
    }
    out["during_over_normal"] = out["step_during_upload_s"] / out["normal_step_s"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
