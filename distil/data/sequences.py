"""Documents -> token ids -> training sequences -> a held-out split, as streams.

Arrays, not Python lists, flow between the steps: a batch of documents is one flat int32
array of token ids and the length of each document; a batch of sequences is the same with
each sequence's length. Every step keeps its state across batches, so the result does not
depend on how the corpus was cut into batches -- one process or a Ray Data pipeline over a
cluster (distil/data/prepared.py) give the same sequences.
"""

from __future__ import annotations

# Imports inside functions: the tokenizers library where a tokenizer is rebuilt from its
# serialization (in Ray Data tasks too).
import hashlib

import numpy as np

from distil.errors import UserError

PIECE_CHARS = 1 << 16  # the longest string handed to the tokenizer
CALL_CHARS = 1 << 22  # text per tokenizer call: its encodings take ~100x the text's size


def tokenizer_spec(tokenizer) -> str:
    """The teacher's tokenizer as its Rust serialization: all that decides the ids, and what a
    read task on another node rebuilds it from (no transformers import there)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            "the teacher's tokenizer is not a fast (Rust) tokenizer",
            where="teacher.name_or_path",
            fix="use a teacher with a tokenizer.json (every current BERT-family model has one)",
        )
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(backend.to_str())
    tok.no_truncation()  # call-time settings that transformers writes into the backend
    tok.no_padding()
    return tok.to_str()


def split_long(text: str) -> list[str]:
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


_TOKENIZERS: dict[str, object] = {}  # per process: a Ray worker process runs many read tasks


def _tokenizer(spec: str):
    key = hashlib.sha256(spec.encode()).hexdigest()
    if key not in _TOKENIZERS:
        import tokenizers

        _TOKENIZERS[key] = tokenizers.Tokenizer.from_str(spec)
    return _TOKENIZERS[key]


def token_ids(spec: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 token ids of all texts, each text's number of ids), no special tokens, in
    bounded memory: no string longer than PIECE_CHARS and at most CALL_CHARS of text go to the
    tokenizer at once, so a "document" that is a single 100 MB line needs no giant encoding."""
    tok = _tokenizer(spec)
    owner, pieces = [], []
    for i, text in enumerate(texts):
        for piece in split_long(text):
            owner.append(i)
            pieces.append(piece)
    lens = np.zeros(len(texts), dtype=np.int64)
    parts: list[np.ndarray] = []
    j = 0
    while j < len(pieces):
        k, size = j, 0
        while k < len(pieces) and (k == j or size + len(pieces[k]) <= CALL_CHARS):
            size += len(pieces[k])
            k += 1
        for doc, enc in zip(owner[j:k], tok.encode_batch_fast(pieces[j:k], add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int32)
            parts.append(ids)
            lens[doc] += len(ids)
        j = k
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return flat, lens


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


class Packer:
    """Token ids of documents -> sequences of at most `max_len` with the tokenizer's CLS/SEP.

    'pack': documents joined by SEP and cut into full-length sequences; the rest carries over to
    the next batch (and what is left at the end, shorter than a sequence, is dropped).
    'lines': each document its own sequence, split when too long, pieces shorter than `min_len`
    dropped (DistilBERT's way).
    """

    def __init__(self, cls: int | None, sep: int | None, max_len: int, packing: str, min_len: int):
        if cls is None or sep is None:
            raise UserError("the teacher's tokenizer has no CLS/SEP (or <s>/</s>) tokens", where="teacher.name_or_path")
        self.cls, self.sep, self.body, self.packing, self.min_len = cls, sep, max_len - 2, packing, min_len
        self.carry = np.zeros(0, dtype=np.int32)

    def __call__(self, flat: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._pack(flat, lens) if self.packing == "pack" else self._lines(flat, lens)

    def _pack(self, flat, lens):
        ends = np.cumsum(lens)[lens > 0]  # a SEP after every document that has tokens
        stream = np.concatenate([self.carry, np.insert(flat, ends, self.sep).astype(np.int32)])
        rows = len(stream) // self.body
        self.carry = stream[rows * self.body :].copy()
        body = stream[: rows * self.body].reshape(rows, self.body)
        out = np.empty((rows, self.body + 2), dtype=np.int32)
        out[:, 0], out[:, 1:-1], out[:, -1] = self.cls, body, self.sep
        return out.reshape(-1), np.full(rows, self.body + 2, dtype=np.int64)

    def _lines(self, flat, lens):
        body = self.body
        pieces = (lens + body - 1) // body
        doc = np.repeat(np.arange(len(lens)), pieces)
        nth = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        start = (np.cumsum(lens) - lens)[doc] + nth * body
        length = np.minimum(body, lens[doc] - nth * body)
        keep = length + 2 >= self.min_len
        start, length = start[keep], length[keep]
        out_lens = length + 2
        out = np.empty(int(out_lens.sum()), dtype=np.int32)
        first = np.cumsum(out_lens) - out_lens
        is_body = np.ones(len(out), dtype=bool)
        is_body[first] = is_body[first + out_lens - 1] = False
        out[first], out[first + out_lens - 1] = self.cls, self.sep
        out[is_body] = flat[_ranges(start, length)]
        return out, out_lens.astype(np.int64)


class HeldOut:
    """A seeded, uniform held-out split of a stream of sequences whose length is not known in
    advance: every sequence draws u ~ U(0, 1) (one seeded generator, in stream order) and the
    held-out sequences are the n_eval with the smallest u, n_eval = min(cap, round(fraction *
    n)), at least one when fraction > 0 and n >= 2 (bottom-k sampling). Only the `cap` smallest
    seen so far are kept back; the rest pass straight on to training.

        for flat, lens in batches: write("train", *split.feed(flat, lens))
        train_rest, held_out = split.finish()
    """

    def __init__(self, fraction: float, cap: int, seed: int):
        self.fraction, self.cap = fraction, cap if fraction > 0 else 0
        self.rng = np.random.default_rng([seed, 0x5E1D])
        self.n = 0
        self.kept_u = np.zeros(0)
        self.kept_index = np.zeros(0, dtype=np.int64)
        self.kept: list[np.ndarray] = []

    def feed(self, flat: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sequences of this batch that go to training now (in order), then any kept back
        earlier that this batch pushed out."""
        m = len(lens)
        u = self.rng.random(m)
        index = self.n + np.arange(m)
        self.n += m
        if self.cap == 0 or m == 0:
            return flat, lens
        starts = np.cumsum(lens) - lens
        threshold = self.kept_u.max() if len(self.kept_u) >= self.cap else np.inf
        cand = np.nonzero(u < threshold)[0]  # few once `cap` are kept: about m * cap / n
        if not len(cand):
            return flat, lens
        all_u = np.concatenate([self.kept_u, u[cand]])
        all_index = np.concatenate([self.kept_index, index[cand]])
        all_seqs = self.kept + [flat[starts[c] : starts[c] + lens[c]] for c in cand]
        keep = np.zeros(len(all_u), dtype=bool)
        keep[np.argsort(all_u, kind="stable")[: self.cap]] = True
        old = len(self.kept_u)
        pushed_out = [s for s, k in zip(all_seqs[:old], keep[:old]) if not k]
        self.kept_u, self.kept_index = all_u[keep], all_index[keep]
        self.kept = [s for s, k in zip(all_seqs, keep) if k]
        to_train = np.ones(m, dtype=bool)
        to_train[cand[keep[old:]]] = False
        mine = flat[_ranges(starts[to_train], lens[to_train])], lens[to_train]
        if not pushed_out:
            return mine
        more = _join(pushed_out)
        return np.concatenate([mine[0], more[0]]), np.concatenate([mine[1], more[1]])

    def finish(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((the rest of training), (the held-out sequences, in stream order))."""
        n_eval = min(self.cap, int(round(self.fraction * self.n)))
        if self.fraction > 0 and self.n >= 2:
            n_eval = max(n_eval, 1)
        order = np.argsort(self.kept_u, kind="stable")
        held, rest = np.sort(self.kept_index[order[:n_eval]]), np.sort(self.kept_index[order[n_eval:]])
        by_index = {int(i): s for i, s in zip(self.kept_index, self.kept)}
        return _join([by_index[int(i)] for i in rest]), _join([by_index[int(i)] for i in held])


def _join(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not seqs:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    return np.concatenate(seqs), np.array([len(s) for s in seqs], dtype=np.int64)
