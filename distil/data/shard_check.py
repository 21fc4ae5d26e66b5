"""Whether a prepared folder (distil/data/shards.py) holds what its manifest says, checked the way
a checkpoint is (distil/storage/integrity.py `verify`), plus what only token data can get wrong.

What is checked:
- the manifest itself: its fields and their types, shard names, a token dtype that fits the
  vocabulary, each file's size implied by its token and sequence counts;
- every file: present, a regular file, its size and sha256;
- the contents: each offsets index starts at 0, never decreases and ends at the shard's token
  count; every token id is below the vocabulary size (an id past it would index past the
  embedding table); counts.npy is one int64 per vocabulary entry.

Hashing a 16 GB corpus's tokens takes a while, and every restart of every rank opens the data,
so a local folder is hashed once per host: the check leaves a record beside the files
(`.verified-<host>.json`: the manifest's sha256 and each file's size, mtime, ctime and inode)
and a later open on that host trusts the files while their stat is unchanged. Editing a file
changes its ctime, which no user call can set back, so a file changed after the check is
hashed again. One process of a host hashes while the others wait (a file lock), so the ranks
of a node do not all read the corpus at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np

from distil.errors import UserError
from distil.storage.integrity import verify

# The token dtype of a vocabulary: uint16 when every id fits, else uint32.
DTYPES = {"<u2": 1 << 16, "<u4": 1 << 32}
_SHARD = re.compile(r"^(train|eval)_\d{5}$")
_BLOCK = 1 << 24  # token ids read at a time when looking for the largest one
RACY_NS = 2_000_000_000  # a file changed this close before its check was recorded is checked again


class DamagedData(UserError):
    """A prepared folder that does not hold what its manifest says; `problems`: {file: what}."""

    def __init__(self, where: str, problems: dict[str, str], fix: str):
        self.problems = problems
        shown = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:3]) + ("; ..." if len(problems) > 3 else "")
        super().__init__(f"prepared data in {where} is damaged: {shown}", fix=fix)


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= DTYPES["<u2"] else np.dtype("<u4")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _file_entry_ok(entry) -> bool:
    return (
        isinstance(entry, dict)
        and _is_count(entry.get("size"))
        and isinstance(entry.get("sha256"), str)
        and bool(re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
    )


def manifest_problem(manifest) -> str | None:
    """What makes a manifest unusable, in a phrase, or None."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    vocab, dtype = manifest.get("vocab_size"), manifest.get("dtype")
    if not _is_count(vocab) or vocab == 0:
        return "vocab_size is not a positive whole number"
    if dtype not in DTYPES:
        return f"dtype {dtype!r} is not one of {', '.join(DTYPES)}"
    if np.dtype(dtype) != dtype_for(vocab):
        return f"dtype {dtype} does not fit vocab_size {vocab} (it takes {dtype_for(vocab).str})"
    tokenizer = (
        (manifest.get("prepared") or {}).get("tokenizer") if isinstance(manifest.get("prepared"), dict) else None
    )
    if isinstance(tokenizer, dict) and tokenizer.get("vocab_size") != vocab:
        return f"vocab_size {vocab} is not the tokenizer's {tokenizer.get('vocab_size')!r}"
    if not _file_entry_ok(manifest.get("counts")):
        return "counts has no size and sha256"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or set(splits) != {"train", "eval"}:
        return "splits is not {train, eval}"
    itemsize = np.dtype(dtype).itemsize
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"split {name} lists no shards"
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or shard.get("name") != f"{name}_{i:05d}" or not _SHARD.match(shard["name"]):
                return f"shard {i} of split {name} is not named {name}_{i:05d}"
            n, tokens, files = shard.get("sequences"), shard.get("tokens"), shard.get("files")
            if not (_is_count(n) and _is_count(tokens) and isinstance(files, dict)):
                return f"shard {shard['name']} has no sequence and token counts or files"
            expected = {f"{shard['name']}.tokens": tokens * itemsize, f"{shard['name']}.offsets": (n + 1) * 8}
            if set(files) != set(expected) or not all(_file_entry_ok(e) for e in files.values()):
                return f"shard {shard['name']} does not list its .tokens and .offsets with size and sha256"
            for rel, size in expected.items():
                if files[rel]["size"] != size:
                    return f"{rel} is listed at {files[rel]['size']} bytes, but its counts make it {size}"
        if split.get("sequences") != sum(s["sequences"] for s in shards) or split.get("tokens") != sum(
            s["tokens"] for s in shards
        ):
            return f"split {name}'s totals are not the sum of its shards"
    return None


def _shards(manifest: dict) -> dict[str, dict]:
    """{file name: its shard's entry} for every .tokens and .offsets file."""
    return {rel: shard for split in manifest["splits"].values() for shard in split["shards"] for rel in shard["files"]}


def file_problem(path: Path, rel: str, manifest: dict) -> str | None:
    """What is wrong with the contents of one file whose size and sha256 are as the manifest
    says (a manifest that lists well-formed bytes can still describe impossible data)."""
    vocab = manifest["vocab_size"]
    if rel == "counts.npy":
        try:
            counts = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError):
            return "not a .npy array"
        if counts.shape != (vocab,) or counts.dtype != np.dtype("<i8"):
            return f"holds {counts.dtype} {counts.shape}, not {vocab} int64 counts"
        return None
    shard = _shards(manifest)[rel]
    if rel.endswith(".offsets"):
        offsets = np.fromfile(path, dtype="<i8")
        if len(offsets) != shard["sequences"] + 1 or offsets[0] != 0 or offsets[-1] != shard["tokens"]:
            return f"the offsets do not run from 0 to the shard's {shard['tokens']} tokens"
        if len(offsets) > 1 and np.diff(offsets).min() < 0:
            return "the offsets decrease"
        return None
    tokens = np.memmap(path, dtype=manifest["dtype"], mode="r") if shard["tokens"] else np.zeros(0, dtype=np.uint32)
    largest = max((int(tokens[a : a + _BLOCK].max()) for a in range(0, len(tokens), _BLOCK)), default=-1)
    del tokens
    if largest >= vocab:
        return f"holds token id {largest}, outside the vocabulary of {vocab}"
    return None


def files_of(manifest: dict) -> dict[str, dict]:
    """{file: {size, sha256}} of every file the manifest lists (MANIFEST.json itself aside)."""
    out = {"counts.npy": manifest["counts"]}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            out.update(shard["files"])
    return out


def check(folder: Path, manifest: dict, hashes: bool = True, only: list[str] | None = None) -> dict[str, str]:
    """{file: what is wrong} for a folder and its (well-formed) manifest; {} when it is whole.
    Without `hashes`: sizes only (no file is read). `only`: these files of the manifest."""
    files = {rel: meta for rel, meta in files_of(manifest).items() if only is None or rel in only}
    problems = verify(folder, files, hashes=hashes)
    if hashes:
        for rel in files:
            if rel not in problems:
                found = file_problem(folder / rel, rel, manifest)
                if found:
                    problems[rel] = found
    return problems


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"


def _stats(folder: Path, rels) -> dict[str, list[int]]:
    out = {}
    for rel in rels:
        st = os.stat(folder / rel)
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _record_path(folder: Path) -> Path:
    return folder / f".verified-{_host()}.json"


def record_check(folder: Path, manifest_bytes: bytes, manifest: dict) -> None:
    """Record that this host found `folder`'s files whole as they are now (each file's stat): the
    writer of a preparation, which made and hashed them, and `check_once` after a clean check.
    A folder this process cannot write gets no record (it is then checked at every open)."""
    record = _record_path(folder)
    tmp = record.with_name(f"{record.name}.tmp.{os.getpid()}")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    try:
        tmp.write_text(
            json.dumps(
                {
                    "manifest_sha256": digest,
                    "at_ns": time.time_ns(),
                    "files": _stats(folder, sorted(files_of(manifest))),
                }
            )
        )
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)


def check_once(folder: Path, manifest_bytes: bytes, manifest: dict) -> dict[str, str]:
    """`check` with hashes, unless this host checked these very files before (its record names
    this manifest and every file's stat is unchanged); records a clean check. A file changed
    less than RACY_NS before the record was written is hashed again all the same: a change in
    the same tick of a coarse file-system clock leaves its stat as it was (git's "racy" files)."""
    record = _record_path(folder)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    rels = sorted(files_of(manifest))

    def unchecked() -> list[str] | None:
        """The files the record does not vouch for; None when there is no record of these files."""
        try:
            seen = json.loads(record.read_text())
            stats = _stats(folder, rels)
            if seen.get("manifest_sha256") != digest or seen.get("files") != stats:
                return None
            return [rel for rel, st in stats.items() if st[2] > int(seen["at_ns"]) - RACY_NS]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None

    if unchecked() == []:
        return {}
    try:
        lock = open(folder / f".verify-{_host()}.lock", "a")
    except OSError:  # a folder this process cannot write: check every time, record nothing
        return check(folder, manifest)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the host hashes; the others find its record
        racy = unchecked()
        if racy == []:
            return {}
        problems = check(folder, manifest, only=racy)  # (None: every file)
        if not problems:
            record_check(folder, manifest_bytes, manifest)
        return problems
