"""Training text -> token sequences -> resumable batches.

Sources are local files or folders (.txt: one document per line; .jsonl/.json/.parquet:
a text column), s3:// prefixes (downloaded once into the cache), or hub data-set names.
`datasets` caches the tokenized result, keyed by the source files and the tokenizer.

The sampler is a seeded permutation per epoch; its position counts *global* samples, so a
resumed run -- with the same or another number of workers -- continues exactly where the
last checkpoint left off.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from distil.config import DataSection
from distil.errors import UserError

_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _local_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    files = sorted(f for f in p.rglob("*") if f.suffix in _FORMATS and f.is_file()) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise UserError(f"folder {p} holds no {'/'.join(_FORMATS)} files", where="data.sources")
    for f in files:
        if f.suffix not in _FORMATS:
            raise UserError(f"{f}: unknown file type {f.suffix!r}", where="data.sources",
                            fix=f"use one of {', '.join(_FORMATS)}")
    return files


def is_hub_name(source: str) -> bool:
    return not source.startswith(("s3://", ".", "/", "~")) and not Path(source).exists() and source.count("/") <= 1


def load_documents(cfg: DataSection, storage_options: dict | None = None) -> datasets.Dataset:
    """All sources as one Dataset with a single 'text' column, in a deterministic order."""
    parts = []
    for source in cfg.sources:
        if is_hub_name(source):
            try:
                ds = datasets.load_dataset(source, cfg.hub_config, split="train", cache_dir=cfg.cache_dir, **cfg.hub_kwargs)
            except Exception as e:  # the hub raises many types; all mean "cannot get this data set"
                raise UserError(f"cannot load data set {source!r}: {str(e).splitlines()[0]}", where="data.sources",
                                fix="give an existing local path, an s3:// URI, or a reachable hub data set") from None
        else:
            if source.startswith("s3://"):
                from distil.storage import Storage

                local = Storage(source, **(storage_options or {})).download_tree(Path(cfg.cache_dir or _default_cache()) / "s3")
                files = _local_files(str(local))
            elif not Path(source).expanduser().exists():
                raise UserError(f"{source} does not exist", where="data.sources", fix="correct the path")
            else:
                files = _local_files(source)
            ds = _load_files(files, cfg)
        if cfg.text_field not in ds.column_names:
            raise UserError(f"{source} has no column {cfg.text_field!r} (columns: {ds.column_names})",
                            where="data.text_field", fix="set data.text_field to the column holding the text")
        parts.append(ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds.select_columns(["text"]))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def _load_files(files: list[Path], cfg: DataSection) -> datasets.Dataset:
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(_FORMATS[f.suffix], []).append(str(f))
    parts = []
    for fmt, paths in by_format.items():
        if fmt == "text":
            _check_utf8(paths)
        try:
            parts.append(datasets.load_dataset(fmt, data_files=paths, split="train", cache_dir=cfg.cache_dir))
        except datasets.exceptions.DatasetGenerationError as e:
            cause = e.__cause__ or e.__context__
            raise UserError(f"cannot read {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''} as {fmt}: "
                            f"{type(cause).__name__ if cause else ''} {str(cause or e).splitlines()[0][:200]}",
                            where="data.sources", fix=f"give {fmt} files in UTF-8") from None
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _check_utf8(paths: list[str], chunk: int = 1 << 22) -> None:
    """Text files must be UTF-8: read in chunks (a file may be one huge line), decoded incrementally."""
    import codecs

    for path in paths:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            try:
                while block := f.read(chunk):
                    decoder.decode(block)
                    offset += len(block)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (byte {offset + e.start} cannot be decoded; binary, or another "
                                "encoding such as Latin-1)", where="data.sources",
                                fix=f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt") from None


def _default_cache() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")), "distil")


PIECE_CHARS = 1 << 16  # the longest string handed to the tokenizer
CALL_CHARS = 1 << 22  # text per tokenizer call: its encodings take ~100x the text's size


def _split_long(text: str) -> list[str]:
    """`text` in pieces of at most PIECE_CHARS, cut before a space or newline where there is one
    (the tokenizers split words at whitespace, so the ids are those of the whole text)."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def token_ids(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), in bounded memory: no string longer than
    PIECE_CHARS and at most CALL_CHARS of text go to the tokenizer at once, so a corpus whose
    "document" is a single 100 MB line does not need tens of GB for one giant encoding."""
    owner, pieces = [], []
    for i, text in enumerate(texts):
        for piece in _split_long(text):
            owner.append(i)
            pieces.append(piece)
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    j = 0
    while j < len(pieces):
        k, size = j, 0
        while k < len(pieces) and (k == j or size + len(pieces[k]) <= CALL_CHARS):
            size += len(pieces[k])
            k += 1
        for doc, ids in zip(owner[j:k], tokenizer(pieces[j:k], add_special_tokens=False)["input_ids"]):
            parts[doc].append(np.asarray(ids, dtype=np.int32))
        j = k
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for p in parts]


def tokenize(docs: datasets.Dataset, tokenizer, cfg: DataSection) -> datasets.Dataset:
    """Token sequences with the tokenizer's own special tokens, at most max_len long.

    'pack': documents joined by the separator token and cut into full-length sequences.
    'lines': each document its own sequence, split when too long, dropped when < min_len.
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise UserError("the teacher's tokenizer has no CLS/SEP (or <s>/</s>) tokens", where="teacher.name_or_path")
    body = cfg.max_len - 2

    def pack(batch):
        docs = [d for d in token_ids(tokenizer, batch["text"]) if len(d)]
        if not docs:
            return {"input_ids": []}
        flat = np.concatenate([part for d in docs for part in (d, np.array([sep], dtype=np.int32))])
        rows = flat[:len(flat) // body * body].reshape(-1, body)
        ends = np.full((len(rows), 1), cls, dtype=np.int64), np.full((len(rows), 1), sep, dtype=np.int64)
        return {"input_ids": np.concatenate([ends[0], rows, ends[1]], axis=1)}

    def lines(batch):
        out = []
        for doc in token_ids(tokenizer, batch["text"]):
            for i in range(0, len(doc), body):
                piece = doc[i:i + body]
                if len(piece) + 2 >= cfg.min_len:
                    out.append(np.concatenate([[cls], piece, [sep]]).astype(np.int64))
        return {"input_ids": out}

    fn = pack if cfg.packing == "pack" else lines
    return docs.map(fn, batched=True, batch_size=1000, remove_columns=docs.column_names, num_proc=cfg.num_proc,
                    desc=f"tokenize ({cfg.packing})", new_fingerprint=None)


def split_eval(seqs: datasets.Dataset, cfg: DataSection, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded held-out split: (train, eval)."""
    n = len(seqs)
    n_eval = min(cfg.eval_max_sequences, int(round(cfg.eval_fraction * n)))
    if cfg.eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    perm = np.random.default_rng(seed).permutation(n)
    # flatten_indices: later code reads the Arrow table directly (lengths, token counts).
    return seqs.select(np.sort(perm[n_eval:])).flatten_indices(), seqs.select(np.sort(perm[:n_eval])).flatten_indices()


def token_counts(seqs: datasets.Dataset, vocab_size: int, rows_per_block: int = 1 << 16) -> np.ndarray:
    """Occurrences of every token id in the sequences (for masking.smoothing), summed block by
    block of `rows_per_block` sequences: memory is one block's tokens, never the corpus' (a
    whole-corpus int64 array was ~23 GB a rank for 3.5 B tokens)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in seqs.data.column("input_ids").chunks:
        for start in range(0, len(chunk), rows_per_block):
            flat = pc.list_flatten(chunk.slice(start, rows_per_block)).to_numpy(zero_copy_only=False)
            block = np.bincount(flat, minlength=vocab_size)
            if len(block) > vocab_size:
                raise ValueError(f"token id {len(block) - 1} is outside the vocabulary of {vocab_size}")
            counts += block
    return counts


def collate(rows: list[list[int]], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row, rounded up to a multiple of 8 (tensor-core friendly)."""
    longest = max(len(r) for r in rows)
    width = min(max_len, (longest + 7) // 8 * 8)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def sequence_lengths(seqs: datasets.Dataset) -> np.ndarray:
    return pc.list_value_length(seqs.data.column("input_ids")).to_numpy(zero_copy_only=False)


class ResumableSampler:
    """Global sample order: a seeded permutation per epoch, the tail smaller than a global
    micro-batch dropped. Position = (epoch, samples consumed in it), independent of workers.

    With `lengths`, the permutation is cut into groups of `group` samples, each sorted by
    length, so that consecutive batches hold sequences of similar length and little padding
    (DistilBERT's group_by_size). The group size is fixed, not derived from the batch size,
    so the order stays the same whatever the number of workers.
    """

    def __init__(self, n: int, seed: int, lengths: np.ndarray | None = None, group: int = 1024):
        self.n, self.seed, self.lengths, self.group = n, seed, lengths, group
        self.epoch, self.consumed = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            if self.lengths is not None:
                chunks = [perm[i:i + self.group] for i in range(0, self.n, self.group)]
                perm = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
            self._perm = perm
        return self._perm

    def next_indices(self, global_size: int, rank: int, local_size: int) -> np.ndarray:
        """This rank's slice of the next global micro-batch of `global_size` samples."""
        if self.consumed + global_size > self.n:
            self.epoch, self.consumed, self._perm = self.epoch + 1, 0, None
        start = self.consumed + rank * local_size
        out = self._permutation()[start:start + local_size]
        self.consumed += global_size
        return out

    def peek(self, global_size: int, rank: int, local_size: int) -> np.ndarray:
        """What next_indices would return, without moving this sampler."""
        return copy.copy(self).next_indices(global_size, rank, local_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler saw {state['n']} samples (seed {state['seed']}), this run has "
                             f"{self.n} (seed {self.seed}): the data changed since the checkpoint")
        self.epoch, self.consumed, self._perm = state["epoch"], state["consumed"], None


class Lookahead:
    """Makes the next micro-batch on a background thread while the current step runs on the GPU
    (collating and masking a 64k-token micro-batch takes ~80 ms of a CPU core: as long as half a
    GPU step). `make(key, indices)` builds a batch; `get` returns the one asked for, made ahead
    when it was announced as the next one with the same indices, else made now, and starts on
    the one announced next. Which samples come next is known from a copy of the sampler
    (`ResumableSampler.peek`), so the real one, saved in checkpoints, only moves as batches are
    consumed."""

    def __init__(self, make):
        from concurrent.futures import ThreadPoolExecutor

        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distil-batches")
        self._next = None  # (key, indices, future)

    def get(self, key, indices: np.ndarray, next_key, next_indices: np.ndarray):
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == key and np.array_equal(ahead[1], indices):
            batch = ahead[2].result()
        else:  # the first batch, or the position moved (a resume): what was made ahead is not it
            if ahead is not None:
                ahead[2].cancel()
            batch = self._make(key, indices)
        self._next = (next_key, next_indices, self._pool.submit(self._make, next_key, next_indices))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None

