"""What checking prepared data costs (issue 27): a local prepared folder is hashed and scanned
(sha256 of every file, offsets in order, every token id below the vocabulary) the first time a
host opens it, then trusted on the record of that check while every file's stat is unchanged.

    .venv/bin/python bench/prepared_check.py --gib 1 --out bench/results/prepared_check.json

A synthetic folder of random token ids (vocabulary 30522, uint16, 32 MiB shards, 128-token
sequences) is written with the real writer; then, page cache dropped where the kernel allows:
the first open (`PreparedData(folder)`: hash, scan, record), a second open (the record), and a
full check of warm files (`check="full"`, what `distil prepare` of an S3 store does before it
publishes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.verify_hash import _cpu_model, _drop_cache  # noqa: E402
from distil.data import shards as ts  # noqa: E402


def _write(folder: Path, tokens: int, vocab: int = 30522, seq: int = 128) -> Path:
    rng = np.random.default_rng(0)
    with ts.ShardWriter(folder, vocab) as w:
        block = 1 << 22
        for start in range(0, tokens, block):
            n = min(block, tokens - start) // seq * seq
            w.add_many("train", rng.integers(0, vocab, n, dtype=np.int64), np.full(n // seq, seq))
        w.add_many("eval", rng.integers(0, vocab, 512 * seq, dtype=np.int64), np.full(512, seq))
        return w.close({"prepared": {}})


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="GiB of token ids")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distil-bench-") as tmp:
        folder = _write(Path(tmp) / "fp", int(args.gib * (1 << 30)) // 2)
        files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
        size = sum(f.stat().st_size for f in files)
        for record in folder.glob(".verified-*.json"):  # the writer's: measure a host that opens it first
            record.unlink()
        time.sleep(2.5)  # past shard_check.RACY_NS: the next record vouches for every file
        _drop_cache(files)
        first = _timed(lambda: ts.PreparedData(folder))
        again = _timed(lambda: ts.PreparedData(folder))
        full = min(_timed(lambda: ts.PreparedData(folder, check="full")) for _ in range(2))
    out = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "bytes": size,
        "files": len(files),
        "first_open_s": first,
        "first_open_s_per_gb": first / (size / 1e9),
        "recorded_open_s": again,
        "full_check_warm_s_per_gb": full / (size / 1e9),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
