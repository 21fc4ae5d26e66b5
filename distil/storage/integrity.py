"""Files checked against a manifest of their sizes and sha256 -- how a checkpoint, a pulled
copy of one and prepared data are known to be whole (distil/runs/layout.py, distil/runs/pull.py,
distil/data/shard_check.py): every file present, a regular file reached without a symbolic
link, of its size and sha256. Files are hashed on several threads (hashlib releases the GIL:
bench/RESULTS.md, "Checkpoint verification")."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distil.errors import UserError
from distil.storage.paths import check_relative, symlink_in


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: threads hash files in parallel


def verify(folder: Path, manifest: dict[str, dict], hashes: bool = True) -> dict[str, str]:
    """What is wrong with a folder against its manifest: {file: "missing" | "N bytes, expected M" |
    "sha256 differs..." | "..."}, {} if nothing. Files are hashed on HASH_THREADS threads."""
    problems, to_hash = {}, []
    for rel, want in sorted(manifest.items()):
        try:
            check_relative(rel, "manifest entry")
            size, digest = int(want["size"]), str(want["sha256"])
        except (UserError, KeyError, TypeError, ValueError):
            problems[rel] = "not a valid manifest entry (a path inside the folder with size and sha256)"
            continue
        f = folder / rel
        if symlink_in(folder, rel) is not None:
            problems[rel] = "is a symbolic link (never followed out of its folder)"
        elif not f.is_file():
            problems[rel] = "missing"
        elif f.stat().st_size != size:
            problems[rel] = f"{f.stat().st_size} bytes, expected {size}"
        elif hashes:
            to_hash.append((rel, f, digest))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for (rel, _, digest), actual in zip(to_hash, pool.map(lambda t: sha256_file(t[1]), to_hash)):
            if actual != digest:
                problems[rel] = "sha256 differs from the manifest"
    return dict(sorted(problems.items()))


def describe(problems: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:3]) + ("; ..." if len(problems) > 3 else "")
