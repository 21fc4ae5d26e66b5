"""Prepared token data: sequences written once, as shards, and read memory-mapped by every rank.

    DATA/<fingerprint>/
        train_00000.tokens      token ids back to back, little-endian (uint16 when the vocabulary
                                fits, else uint32)
        train_00000.offsets     int64, sequences + 1 entries: sequence i of the shard is
                                tokens[offsets[i]:offsets[i + 1]]
        train_00001.tokens ...  a new shard every `shard_tokens` tokens
        eval_00000.tokens ...   the held-out split, the same way
        counts.npy              how often each token id occurs in the training split (int64,
                                vocabulary size): summed shard by shard, never a corpus-wide array
        MANIFEST.json           written last: format, fingerprint, dtype, vocabulary size; per split
                                its shards (sequences, tokens, size and sha256 of each file), the
                                sequence count and the length histogram; what was prepared (the
                                fingerprint's inputs) and the library versions

The model is Megatron-LM's indexed dataset: a flat token file and an offsets index opened with
`numpy.memmap`, so a rank reads sample i by its global index and the page cache holds only
what it touched; a shard is a unit to fetch and verify. A folder without MANIFEST.json is never
read: the writer fills `<fingerprint>.partial-<id>` and renames it to `<fingerprint>` only after
the manifest is written, so a preparation killed at any moment leaves nothing that looks done.

The fingerprint covers what the tokens depend on -- the source listing (names, sizes and
mtimes or ETags), the tokenizer's own serialization and special tokens, and the data section
without `cache_dir`, which only says where -- so changed
sources give a new folder, never a mix of old and new tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import numpy as np

from distil.data import shard_check
from distil.data.sequences import tokenizer_spec
from distil.data.shard_check import DamagedData, check_once, files_of, manifest_problem, record_check
from distil.errors import UserError
from distil.processes import gone
from distil.storage.integrity import sha256_file

FORMAT = "distil-tokens/2"  # 2: packing carries across batches; bottom-k held-out split
MANIFEST = "MANIFEST.json"
COUNTS = "counts.npy"
SPLITS = ("train", "eval")
SHARD_TOKENS = 1 << 24  # 16 Mi tokens, 32 MiB of uint16: a first batch fetches a few of them, whatever the corpus
_NOT_FINGERPRINTED = {"cache_dir"}  # where, not what


def tokenizer_identity(tokenizer) -> dict:
    """What of a tokenizer decides the ids: its full serialization (vocabulary, merges,
    normalizer, pre-tokenizer; without call-time truncation and padding) and its special tokens."""

    spec = json.loads(tokenizer_spec(tokenizer))
    return {
        "sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "special": {k: getattr(tokenizer, f"{k}_token_id") for k in ("cls", "sep", "pad", "mask", "unk")},
    }


def fingerprint(data_section: dict, tokenizer: dict, sources: list[dict]) -> tuple[str, dict]:
    """(fingerprint, the inputs it covers): `data_section` as dumped by pydantic, `tokenizer`
    from tokenizer_identity, `sources` one {name, size, version (mtime or ETag)} a file."""
    inputs = {
        "format": FORMAT,
        "data": {k: v for k, v in sorted(data_section.items()) if k not in _NOT_FINGERPRINTED},
        "tokenizer": tokenizer,
        "sources": sorted(sources, key=lambda s: s["name"]),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:20], inputs


def local_sources(files: list[Path]) -> list[dict]:
    """The listing of local source files that a fingerprint covers: each by its absolute path as
    named, not resolved -- a file reached through a symbolic link keeps the name (and the suffix,
    which says its format) it was given, as in the hub's cache (snapshots/.../train.txt ->
    blobs/9f86...) -- with the size and mtime of what it points at."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append({"name": os.path.abspath(os.path.expanduser(f)), "size": st.st_size, "version": st.st_mtime_ns})
    return out


class _Shard:
    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.file = open(folder / f"{name}.tokens", "wb")
        self.offsets = [0]

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, flat: np.ndarray, lens: np.ndarray) -> None:
        self.file.write(flat.astype(self.dtype, copy=False).tobytes())
        self.offsets.extend((self.offsets[-1] + np.cumsum(lens)).tolist())

    def close(self, counts: np.ndarray | None, block: int = 1 << 24) -> dict:
        """Flush and describe the shard; add its token frequencies to `counts` (block by block)."""
        self.file.close()
        np.asarray(self.offsets, dtype="<i8").tofile(self.folder / f"{self.name}.offsets")
        if counts is not None and self.tokens:
            tokens = np.memmap(self.folder / f"{self.name}.tokens", dtype=self.dtype, mode="r")
            for start in range(0, len(tokens), block):
                counts += np.bincount(tokens[start : start + block], minlength=len(counts))[: len(counts)]
            del tokens
        files = {f"{self.name}.{kind}": None for kind in ("tokens", "offsets")}
        for rel in files:
            files[rel] = {"size": (self.folder / rel).stat().st_size, "sha256": sha256_file(self.folder / rel)}
        return {"name": self.name, "sequences": len(self.offsets) - 1, "tokens": self.tokens, "files": files}


WRITER = ".writer"  # in a .partial- folder: which process fills it


def _remove_abandoned(final: Path) -> None:
    """Delete the .partial- folders of `final` whose writer was a process of this host that is
    gone (a preparation killed, e.g. with SIGKILL or a pod's OOM); another host's, or a living
    process's (another torchrun rank), are left alone."""
    for partial in final.parent.glob(f"{final.name}.partial-*") if final.parent.is_dir() else ():
        try:
            writer = json.loads((partial / WRITER).read_text())
        except (OSError, ValueError):
            continue
        if writer.get("host") != socket.gethostname():
            continue
        try:
            pid = int(writer["pid"])
        except (KeyError, ValueError, TypeError):
            continue
        if gone(pid):
            shutil.rmtree(partial, ignore_errors=True)


class ShardWriter:
    """Writes sequences into `folder` (a new folder named after the fingerprint), shard by
    shard; `close()` writes the manifest and only then moves the folder into place.

        with ShardWriter(root / fp, vocab_size) as w:
            for seq in sequences: w.add("train", seq)
            w.close(info)
    """

    def __init__(self, folder: Path, vocab_size: int, shard_tokens: int = SHARD_TOKENS):
        self.final = Path(folder)
        if (self.final / MANIFEST).is_file():
            raise FileExistsError(f"{self.final} is prepared already")
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
        self.tmp = self.final.with_name(f"{self.final.name}.partial-{uuid.uuid4().hex[:12]}")
        _remove_abandoned(self.final)
        self.tmp.mkdir(parents=True)
        (self.tmp / WRITER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.open: dict[str, _Shard] = {}
        self.done: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.lengths: dict[str, np.ndarray] = {s: np.zeros(0, dtype=np.int64) for s in SPLITS}

    def add(self, split: str, seq) -> None:
        seq = np.asarray(seq)
        self.add_many(split, seq, np.array([len(seq)]))

    def add_many(self, split: str, flat: np.ndarray, lens: np.ndarray) -> None:
        """Sequences back to back: `flat` token ids, `lens` each sequence's length. A shard is
        closed once it holds `shard_tokens` tokens (after the sequence that crosses the line)."""
        flat, lens = np.asarray(flat), np.asarray(lens, dtype=np.int64)
        if int(lens.sum()) != len(flat):
            raise ValueError(f"{len(flat)} tokens, but the lengths add up to {int(lens.sum())}")
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(f"token id outside the vocabulary of {self.vocab_size}")
        if len(lens):
            hist = self.lengths[split]
            if lens.max() >= len(hist):
                hist = self.lengths[split] = np.concatenate(
                    [hist, np.zeros(int(lens.max()) + 1 - len(hist), dtype=np.int64)]
                )
            hist += np.bincount(lens, minlength=len(hist))
        while len(lens):
            shard = self.open.get(split)
            if shard is None:
                shard = self.open[split] = _Shard(self.tmp, f"{split}_{len(self.done[split]):05d}", self.dtype)
            ends = np.cumsum(lens)
            k = min(int(np.searchsorted(ends, self.shard_tokens - shard.tokens, side="left")) + 1, len(lens))
            shard.add(flat[: ends[k - 1]], lens[:k])
            flat, lens = flat[ends[k - 1] :], lens[k:]
            if shard.tokens >= self.shard_tokens:
                self._close_shard(split)

    def _close_shard(self, split: str) -> None:
        shard = self.open.pop(split)
        self.done[split].append(shard.close(self.counts if split == "train" else None))

    def close(self, info: dict) -> Path:
        """Finish every shard, write counts.npy and MANIFEST.json (last), move into place."""
        for split in list(self.open):
            self._close_shard(split)
        np.save(self.tmp / COUNTS, self.counts)
        splits = {}
        for split in SPLITS:
            shards = self.done[split]
            splits[split] = {
                "sequences": sum(s["sequences"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "length_histogram": {str(n): int(c) for n, c in enumerate(self.lengths[split]) if c},
                "shards": shards,
            }
        manifest = {
            "format": FORMAT,
            "fingerprint": self.final.name,
            "dtype": self.dtype.str,
            "vocab_size": self.vocab_size,
            "splits": splits,
            "counts": {"size": (self.tmp / COUNTS).stat().st_size, "sha256": sha256_file(self.tmp / COUNTS)},
            **info,
        }
        tmp_manifest = self.tmp / f".{MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        # The files were made and hashed here, token ids checked as they were added: the next
        # open on this host need not hash them again (renaming the folder keeps their stat).
        record_check(self.tmp, (self.tmp / MANIFEST).read_bytes(), manifest)
        (self.tmp / WRITER).unlink()
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another process prepared the same fingerprint first: theirs is as good
            if not (self.final / MANIFEST).is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        for shard in self.open.values():
            shard.file.close()
        self.open.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None or self.tmp.exists():
            self.abort()  # an exception, or close() never called: nothing is left that looks done


class TokenSplit:
    """One split of a prepared folder: sequences by global index, memory-mapped. A shard's
    tokens are opened on first use, through `fetch` (which brings a remote shard into the local
    cache and verifies it): a rank reads only the shards its samples are in."""

    def __init__(self, folder: Path, meta: dict, dtype: np.dtype, fetch=None):
        self.meta, self.folder, self.dtype = meta, folder, dtype
        self._fetch = fetch or (lambda rel: folder / rel)
        self._tokens: list[np.ndarray | None] = [None] * len(meta["shards"])
        self._lock = threading.Lock()
        self._offsets = [np.fromfile(self._fetch(f"{s['name']}.offsets"), dtype="<i8") for s in meta["shards"]]
        self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])  # first global index of each shard

    def _shard_tokens(self, k: int) -> np.ndarray:
        tokens = self._tokens[k]
        if tokens is None:
            with self._lock:  # the batch thread and the step may both ask
                if self._tokens[k] is None:
                    shard = self.meta["shards"][k]
                    self._tokens[k] = (
                        np.memmap(self._fetch(f"{shard['name']}.tokens"), dtype=self.dtype, mode="r")
                        if shard["tokens"]
                        else np.zeros(0, dtype=self.dtype)
                    )
                tokens = self._tokens[k]
        return tokens

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, dtype=np.int64)

    def sequence(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - self._starts[shard]
        off = self._offsets[shard]
        return np.asarray(self._shard_tokens(shard)[off[j] : off[j + 1]], dtype=np.int64)

    def rows(self, indices) -> list[list[int]]:
        """The sequences at these global indices, as lists (what `data.collate` takes)."""
        return [self.sequence(int(i)).tolist() for i in indices]


def read_checked(folder: Path, expect: dict | None = None, check: str | None = "once") -> dict:
    """The manifest of a prepared folder, checked (distil/data/shard_check.py): its fields, that it
    was made from `expect` (the inputs a rank knows: all but the sources), and with `check` its
    files -- "once" (sha256 and contents, once per host: a record of the check makes a later open
    cost a stat per file), "full" (every time), "sizes" (sizes only) or None (not here: a remote
    store's cache checks each file as it fetches it). Nothing else is read."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} holds no prepared data (no {MANIFEST}: never prepared, or cut short)",
            fix="prepare it again (`distil prepare`)",
        )
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedData(str(folder), {MANIFEST: "not valid JSON"}, fix=_FIX) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(
            f"{folder} was prepared in format {found!r}, this distil-run reads {FORMAT!r}", fix="prepare it again"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise DamagedData(str(folder), {MANIFEST: problem}, fix=_FIX)
    made_from = manifest.get("prepared") or {}
    if expect is not None and {k: made_from.get(k) for k in expect} != expect:
        raise UserError(
            f"{folder} was prepared from other sources, another tokenizer or another data section "
            f"(differs in: {', '.join(_differing({k: made_from.get(k) for k in expect}, expect))})",
            fix="prepare again for this config; a folder is only ever read for the inputs it was made from",
        )
    if check is not None:
        problems = (
            check_once(folder, raw, manifest)
            if check == "once"
            else shard_check.check(folder, manifest, hashes=check == "full")
        )
        if problems:
            raise DamagedData(str(folder), problems, fix=_FIX)
    return manifest


class PreparedData:
    """A prepared folder, read by global index: its manifest and files checked first
    (`read_checked`, with `check`). With `fetch` (a cache of a remote store) a file is checked
    when it is fetched instead."""

    def __init__(self, folder: Path, expect: dict | None = None, check: str = "once", fetch=None):
        self.folder = Path(folder)
        self.manifest = read_checked(self.folder, expect, check if fetch is None else None)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.splits = {
            name: TokenSplit(self.folder, meta, self.dtype, fetch) for name, meta in self.manifest["splits"].items()
        }

    def files(self) -> dict[str, dict]:
        return files_of(self.manifest)

    def counts(self) -> np.ndarray:
        return np.load(self.folder / COUNTS)  # (a remote store's cache fetches it on open)

    def __getitem__(self, split: str) -> TokenSplit:
        return self.splits[split]


_FIX = "delete the folder and prepare again (`distil prepare`, or start the run: it prepares what is missing)"


def _differing(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)] or ["?"]
