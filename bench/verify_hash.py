"""What verifying a checkpoint costs: seconds per GB to check every file's size and sha256
against its manifest (`distil.storage.integrity.verify`, which resume, export and pull run), with one
hashing thread and with HASH_THREADS.

    .venv/bin/python bench/verify_hash.py --gib 2 --files 16 --out bench/results/verify_hash_cpu.json

The files are random bytes written to a temporary folder (the page cache is dropped for them
with posix_fadvise where the kernel allows, so the first pass reads from disk; the later
passes of each setting read from cache, and both are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil.runs import layout as ckpt  # noqa: E402
from distil.storage import integrity  # noqa: E402


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def _drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    ap.add_argument("--files", type=int, default=8, help="number of files (a ZeRO checkpoint has a shard per rank)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per setting (the first after a cache drop)")
    ap.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    size = int(args.gib * 2**30) // args.files
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        files = []
        for i in range(args.files):
            f = d / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt"
            with open(f, "wb") as out:
                for _ in range(0, size, 1 << 24):
                    out.write(os.urandom(min(1 << 24, size)))
                out.truncate(size)
            files.append(f)
        manifest = ckpt.rank_manifest(d, 0) | {
            f.name: {"size": size, "sha256": integrity.sha256_file(f)} for f in files
        }
        gb = sum(v["size"] for v in manifest.values()) / 1e9
        rows = []
        for threads in sorted({1, integrity.HASH_THREADS}):
            integrity.HASH_THREADS = threads
            for rep in range(args.repeats):
                if rep == 0:
                    _drop_cache(files)
                t0 = time.perf_counter()
                assert integrity.verify(d, manifest) == {}
                dt = time.perf_counter() - t0
                rows.append(
                    {
                        "threads": threads,
                        "pass": rep,
                        "cold": rep == 0,
                        "seconds": dt,
                        "s_per_gb": dt / gb,
                        "gb_per_s": gb / dt,
                    }
                )
                print(
                    f"threads {threads} pass {rep} ({'cache dropped' if rep == 0 else 'warm'}): {dt:.2f} s, "
                    f"{dt / gb:.2f} s/GB, {gb / dt:.2f} GB/s",
                    flush=True,
                )
    result = {
        "bench": "verify_hash",
        "gb": gb,
        "files": args.files,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
