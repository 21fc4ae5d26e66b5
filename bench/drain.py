"""Measure what a pod drain costs: the time from the preStop hook starting to the checkpoint
being persisted in S3, for a DistilBERT-size student (6 x 768 from a 12 x 768 teacher, vocab
30522), through the real path: a Ray job (jobs/distill.py) with CPU workers, checkpoints in
a local S3 endpoint (moto_server), the hook `python -m distil.runs.preempt`.

    .venv/bin/python bench/drain.py --workers 2 --out bench/results/drain_cpu.json

The drain time is the rest of the step in flight + writing the checkpoint (DeepSpeed shards,
manifest hashes) + uploading it; the run's metrics give the last two, the step time is read
from tokens/s. On a cluster, the upload scales with the checkpoint size over the bandwidth to
the store; this loopback store gives the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def teacher(dest: Path) -> Path:
    """A random bert-base-uncased-shaped BertForMaskedLM with the bert-base-uncased vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "all-MiniLM-L6-v2")
    BertForMaskedLM(BertConfig(vocab_size=len(tok), architectures=["BertForMaskedLM"])).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    time.sleep(3)
    return proc, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    import boto3
    import yaml

    work = Path(tempfile.mkdtemp(prefix="distil-drain-"))
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
        RAY_ADDRESS="local",
        DISTIL_PREEMPT_FILE=str(work / "preempt"),
        DISTIL_PREEMPT_WAIT="3600",
    )
    server, url = moto(work / "moto.log")
    job = None
    try:
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket="drain")
        cfg = {
            "run": {"name": "drain", "seed": 0},
            "teacher": {"name_or_path": str(teacher(work / "teacher"))},
            "student": {"layers": [0, 2, 4, 7, 9, 11]},
            "data": {
                "sources": [str(ROOT / "data" / "brown" / "brown_sample.txt")],
                "max_len": a.seq,
                "packing": "pack",
                "cache_dir": str(work / "cache"),
            },
            "train": {
                "max_steps": 10_000,
                "micro_batch_size": a.micro_batch,
                "global_batch_size": a.micro_batch * a.workers,
                "log_every": 1,
                "progress_bar": False,
            },
            "checkpoint": {"every_steps": 10_000},
            "storage": {"uri": "s3://drain/runs", "endpoint_url": url},
            "scaling": {"num_workers": a.workers, "cpus_per_worker": 1},
        }
        (work / "c.yaml").write_text(yaml.safe_dump(cfg))
        job = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(work / "c.yaml")],
            stdout=open(work / "job.log", "w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.time() + 1800
        while not re.search(r"\bstep=3\b", (work / "job.log").read_text()):  # a few steps in: warm
            if job.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the job ended or stalled before step 3; see {work / 'job.log'}")
            time.sleep(1)
        t0 = time.perf_counter()
        hook = subprocess.run(
            [sys.executable, "-m", "distil.runs.preempt", "--timeout", "1200"], capture_output=True, text=True
        )
        drain_s = time.perf_counter() - t0
        m = re.search(r"checkpoint at step (\d+) persisted", hook.stdout)
        if not m:
            raise SystemExit(f"no checkpoint acknowledged: {hook.stdout}{hook.stderr}")
        step = int(m.group(1))
        rows = [
            json.loads(line)
            for line in s3.get_object(Bucket="drain", Key="runs/drain/metrics.jsonl")["Body"].read().splitlines()
        ]
        saved = next(r for r in rows if "checkpoint/save_s" in r)
        rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first step warms up
        step_s = a.micro_batch * a.workers * a.seq / (sum(rates) / len(rates))
        objects = s3.list_objects_v2(Bucket="drain", Prefix=f"runs/drain/step_{step:08d}/")["Contents"]
        result = {
            "workers": a.workers,
            "seq": a.seq,
            "micro_batch": a.micro_batch,
            "drain_s": round(drain_s, 2),
            "step_s": round(step_s, 2),
            "save_s": round(saved["checkpoint/save_s"], 2),
            "upload_s": round(saved["checkpoint/upload_s"], 2),
            "checkpoint_bytes": sum(o["Size"] for o in objects),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, no GPU",
        }
        print(json.dumps(result, indent=1))
        if a.out:
            a.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, 9)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
