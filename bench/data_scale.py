"""Data at scale (issue 15): preparation throughput, time to the first optimizer step, and a
training rank's memory, on synthetic corpora of two sizes.

    .venv/bin/python bench/data_scale.py --sizes 0.2 1.0          # everything, ~40 min on 2 cores
    .venv/bin/python bench/data_scale.py --sizes 0.2 --only prepare

Corpus: lines of the committed English (data/brown, tests/assets) and Polish (tests/assets)
texts, shuffled with a fixed seed and repeated into 64 MB files until the size is reached.
Tokenizer and teacher: the demo's all-MiniLM-L6-v2 (models/, `make setup` links it).

(a) prepare: `distil prepare --ray --workers N` for N = 1, 2 (Ray Data tasks on a local Ray
    instance) and `--in-process`; tokens/s as preparation reports it (read, tokenize, pack,
    split, write; Ray's start not included).
(b) first step: `jobs/distill.py` with two Ray Train workers, storage and prepared data in S3
    (moto_server on loopback), each start with an empty data cache (new pods): seconds from the
    process start to the first training-metrics line -- a first run (it prepares the data), a
    second run of the same data (prepared), and the first run resumed from its checkpoint.
(c) rank memory: peak RSS (ru_maxrss) of one local training process (`distil train`, the data
    prepared in (a)) over a few steps.
Every figure comes with the machine, date and versions; paste the JSON into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEXTS = [
    ROOT / "data" / "brown" / "brown_sample.txt",
    ROOT / "tests" / "assets" / "en_brown_800.txt",
    ROOT / "tests" / "assets" / "pl_libreoffice_300.txt",
]
FILE_BYTES = 64 << 20


def make_corpus(folder: Path, gb: float) -> Path:
    """`gb` GB of text in 64 MB files (kept between runs of the bench)."""
    target = int(gb * 1e9)
    done = folder / "DONE"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lines = [x for t in TEXTS for x in t.read_text().splitlines() if x.strip()]
    rng, written, k = random.Random(0), 0, 0
    while written < target:
        rng.shuffle(lines)
        block = ("\n".join(lines) + "\n").encode()
        with open(folder / f"part_{k:04d}.txt", "wb") as f:
            for _ in range(max(1, min(FILE_BYTES, target - written) // len(block))):
                f.write(block)
                written += len(block)
        k += 1
    done.write_text(str(written))
    return folder


def config(work: Path, corpus: Path, storage: dict, **train) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["teacher"]["name_or_path"] = str(ROOT / "models" / "all-MiniLM-L6-v2")
    cfg["student"]["layers"] = [0]
    cfg["data"].update(sources=[str(corpus)], packing="pack", max_len=128, eval_max_sequences=512)
    cfg["train"].update(max_steps=2, micro_batch_size=8, global_batch_size=16, log_every=1, progress_bar=False, **train)
    cfg["checkpoint"].update(every_steps=2, keep_last=2)
    cfg["storage"] = storage
    cfg.pop("eval", None)  # the demo's out-of-domain text and probe: not what this bench measures
    path = work / f"config-{abs(hash(json.dumps([str(corpus), storage, train], sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **extra}


def prepare(work: Path, corpus: Path, how: list[str]) -> dict:
    storage = work / f"prep-{'-'.join(how).strip('-')}"
    shutil.rmtree(storage, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run(
        [PY, "-m", "distil.cli", "prepare", "--config", str(config(work, corpus, {"uri": str(storage)})), *how],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    m = re.search(r"prepared ([\d,]+) documents, ([\d,]+) tokens in ([\d.]+) s", r.stdout)
    return {
        "how": " ".join(how),
        "tokens": int(m[2].replace(",", "")),
        "seconds": float(m[3]),
        "tokens_per_s": int(m[2].replace(",", "")) / float(m[3]),
        "wall_s": time.perf_counter() - t0,
        "storage": str(storage),
    }


BASELINE = r"""
import sys, time
from transformers import AutoTokenizer
from distil.config.schema import load_config
from distil.data.prepared import open_prepared
cfg = load_config(sys.argv[1], [])
tok = AutoTokenizer.from_pretrained(cfg.teacher.name_or_path)
t0 = time.perf_counter()
store = open_prepared(cfg, tok, 16, log=lambda _: None)
took = time.perf_counter() - t0
print(sum(int(s["tokens"]) for s in store.manifest["splits"].values()), took)
"""


def baseline(work: Path, corpus: Path, code: str) -> dict:
    """The preparation of another checkout (`--baseline-code`, e.g. the one before Ray Data) in
    one process: tokens/s of its whole preparation."""
    storage = work / "prep-baseline"
    shutil.rmtree(storage, ignore_errors=True)
    cfg = config(work, corpus, {"uri": str(storage)})
    r = subprocess.run(
        [PY, "-c", BASELINE, str(cfg)],
        capture_output=True,
        text=True,
        cwd=code,
        env=_env(PYTHONPATH=code, HF_HOME=str(work / "hf-baseline")),
    )
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    tokens, took = r.stdout.split()[-2:]
    shutil.rmtree(work / "hf-baseline", ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "how": f"baseline {code}",
        "tokens": int(tokens),
        "seconds": float(took),
        "tokens_per_s": int(tokens) / float(took),
    }


def first_step(work: Path, corpus: Path, endpoint: str, prefix: str, name: str, steps: int) -> dict:
    """Seconds from `jobs/distill.py` starting to its first metrics row (the step after the
    run's latest checkpoint), with an empty data cache (new pods)."""
    cache = work / f"cache-{time.monotonic_ns()}"
    cfg = config(work, corpus, {"uri": f"s3://{prefix}", "endpoint_url": endpoint})
    args = [
        PY,
        str(ROOT / "jobs" / "distill.py"),
        "--config",
        str(cfg),
        "--set",
        f"data.cache_dir={cache}",
        "--set",
        f"run.name={name}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "scaling.num_workers=2",
        "--set",
        "scaling.cpus_per_worker=1",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=_env(RAY_ADDRESS="local", RAY_DEDUP_LOGS="0"),
    )
    first, lines, want = None, [], f"step={steps - 1} "
    for line in proc.stdout:
        lines.append(line)
        if first is None and want in line and "loss=" in line:
            first = time.perf_counter() - t0
    proc.wait()
    if proc.returncode or first is None:
        raise SystemExit("".join(lines[-60:]))
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds_to_first_step": first, "seconds_total": time.perf_counter() - t0}


def rank_rss(work: Path, corpus: Path, storage: str) -> dict:
    """Peak RSS of one local training process whose data is already prepared in `storage`."""
    cfg = config(work, corpus, {"uri": storage})
    proc = subprocess.Popen(
        [PY, "-m", "distil.cli", "train", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status or "preparing the data" in out:
        raise SystemExit(out[-3000:])
    return {"peak_rss_mib": usage.ru_maxrss / 1024}


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import start_moto as start

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return start(work)


def machine() -> dict:
    import ray
    import tokenizers

    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if x.startswith("Model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "tokenizers": tokenizers.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.2, 1.0], help="corpus sizes in GB")
    ap.add_argument("--work", default="/tmp/distil-data-scale", help="corpora, prepared data and caches")
    ap.add_argument("--only", choices=["prepare", "first-step", "rss"], action="append", help="run only these parts")
    ap.add_argument("--baseline-code", help="a checkout whose preparation to time as well (one process, smallest size)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ["prepare", "first-step", "rss"])
    out = {"machine": machine(), "sizes": {}}
    moto = None
    for gb in args.sizes:
        corpus = make_corpus(work / f"corpus-{gb}GB", gb)
        res = out["sizes"][f"{gb}GB"] = {"bytes": int((corpus / "DONE").read_text())}
        if parts & {"prepare", "rss"}:
            res["prepare"] = [
                prepare(work, corpus, how)
                for how in (["--ray", "--workers", "1"], ["--ray", "--workers", "2"], ["--in-process"])
            ]
            r1, r2 = res["prepare"][0]["tokens_per_s"], res["prepare"][1]["tokens_per_s"]
            res["ray_2_over_1"] = r2 / r1
            if args.baseline_code and gb == min(args.sizes):
                res["prepare"].append(baseline(work, corpus, args.baseline_code))
        if "rss" in parts:
            res["rank"] = rank_rss(work, corpus, res["prepare"][2]["storage"])
        if "first-step" in parts:
            if moto is None:
                moto = start_moto(work)
                import boto3

                boto3.client("s3", endpoint_url=moto[1]).create_bucket(Bucket="bench")
            prefix = f"bench/{gb}GB-{time.monotonic_ns()}"
            res["first_step"] = {
                "fresh, data not prepared (prepares it)": first_step(work, corpus, moto[1], prefix, "a", 2),
                "fresh, data prepared": first_step(work, corpus, moto[1], prefix, "b", 2),
                "resume from step 2": first_step(work, corpus, moto[1], prefix, "a", 4),
            }
        print(json.dumps({gb: res}), flush=True)
    if moto is not None:
        moto[0].terminate()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
