"""Loading, tokenization, packing, held-out split and the resumable sampler."""

import json

import numpy as np
import pytest

from distil.config import DataSection
from distil.data import ResumableSampler, load_documents, sequence_lengths, split_eval, token_counts, tokenize
from distil.errors import UserError
from tests.conftest import EN_TEXT


def section(tmp_path, **kw):
    return DataSection(**{"sources": [str(EN_TEXT)], "cache_dir": str(tmp_path / "cache"), **kw})


def test_pack_joins_documents_and_cuts_full_sequences(tmp_path, wordpiece):
    cfg = section(tmp_path, max_len=32, max_documents=50)
    docs = load_documents(cfg)
    seqs = tokenize(docs, wordpiece, cfg)
    rows = list(seqs["input_ids"])
    assert all(len(r) == 32 and r[0] == wordpiece.cls_token_id and r[-1] == wordpiece.sep_token_id for r in rows)
    stream = []
    for d in wordpiece(list(docs["text"]), add_special_tokens=False)["input_ids"]:
        stream += d + [wordpiece.sep_token_id]
    body = [t for r in rows for t in r[1:-1]]
    assert body == stream[: len(body)] and len(stream) - len(body) < 30


def test_lines_split_long_documents_and_drop_short(tmp_path, wordpiece):
    cfg = section(tmp_path, max_len=16, packing="lines", min_len=6, max_documents=40)
    docs = load_documents(cfg)
    rows = list(tokenize(docs, wordpiece, cfg)["input_ids"])
    expected = []
    for d in wordpiece(list(docs["text"]), add_special_tokens=False)["input_ids"]:
        for i in range(0, len(d), 14):
            seq = [wordpiece.cls_token_id, *d[i:i + 14], wordpiece.sep_token_id]
            if len(seq) >= 6:
                expected.append(seq)
    assert rows == expected
    assert all(6 <= len(r) <= 16 for r in rows)


def test_jsonl_parquet_and_folders(tmp_path, wordpiece):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(json.dumps({"body": f"json line {i}"}) for i in range(3)))
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), d / "sub" / "b.parquet")
    docs = load_documents(section(tmp_path, sources=[str(d)], text_field="body"))
    assert sorted(list(docs["text"])) == sorted([f"json line {i}" for i in range(3)] + ["parquet one", "parquet two"])
    with pytest.raises(UserError, match="data.text_field"):
        load_documents(section(tmp_path, sources=[str(d)], text_field="missing"))


def test_missing_source_and_empty_lines(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_documents(section(tmp_path, sources=[str(tmp_path / "nope.txt")]))
    f = tmp_path / "blank.txt"
    f.write_text("\n  \nreal text\n\n")
    assert list(load_documents(section(tmp_path, sources=[str(f)]))["text"]) == ["real text"]


def test_split_is_seeded_disjoint_and_complete(tmp_path, wordpiece):
    cfg = section(tmp_path, max_len=32, eval_fraction=0.1, eval_max_sequences=1000)
    seqs = tokenize(load_documents(cfg), wordpiece, cfg)
    tr, ev = split_eval(seqs, cfg, seed=1)
    tr2, ev2 = split_eval(seqs, cfg, seed=1)
    _, ev3 = split_eval(seqs, cfg, seed=2)
    assert list(ev["input_ids"]) == list(ev2["input_ids"]) and list(ev["input_ids"]) != list(ev3["input_ids"])
    assert len(tr) + len(ev) == len(seqs) and len(ev) == round(0.1 * len(seqs))
    as_set = lambda d: {tuple(r) for r in list(d["input_ids"])}
    assert as_set(tr) | as_set(ev) == as_set(seqs) and not as_set(tr) & as_set(ev)
    counts = token_counts(tr, len(wordpiece))
    assert counts.sum() == sum(len(r) for r in list(tr["input_ids"])) and counts[wordpiece.cls_token_id] == len(tr)
    by_hand = np.zeros(len(wordpiece), dtype=np.int64)
    for row in tr["input_ids"]:
        np.add.at(by_hand, row, 1)
    assert np.array_equal(counts, by_hand)
    assert np.array_equal(token_counts(tr, len(wordpiece), rows_per_block=7), by_hand)  # summed over many blocks
    assert sequence_lengths(tr).tolist() == [len(r) for r in list(tr["input_ids"])]


def _take(sampler, world, local, steps):
    """Global batches as `world` workers see them: each worker holds its own copy of the sampler."""
    copies = [sampler] + [ResumableSampler(sampler.n, sampler.seed, sampler.lengths, sampler.group) for _ in range(world - 1)]
    for c in copies[1:]:
        c.load_state_dict(sampler.state_dict())
    return [np.concatenate([c.next_indices(world * local, r, local) for r, c in enumerate(copies)]) for _ in range(steps)]


def test_sampler_resumes_exactly_and_ignores_world_size():
    a = ResumableSampler(103, seed=7)
    first = _take(a, 1, 8, 5)
    state = a.state_dict()
    rest = _take(a, 1, 8, 30)  # crosses an epoch boundary
    b = ResumableSampler(103, seed=7)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(_take(b, 1, 8, 30), rest))
    # Two workers with half the batch each see the same global batches.
    c = ResumableSampler(103, seed=7)
    c.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(_take(c, 2, 4, 30), rest))
    # One epoch visits every index at most once, and all but a tail smaller than a batch.
    epoch = np.concatenate(first + rest[:7])
    assert len(set(epoch.tolist())) == len(epoch) == 96
    with pytest.raises(ValueError, match="data changed"):
        ResumableSampler(104, seed=7).load_state_dict(state)


def test_length_grouping_is_a_permutation_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 64, size=4000)
    s = ResumableSampler(4000, seed=0, lengths=lengths, group=512)
    batches = _take(s, 1, 32, 4000 // 32)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(4000))
    padded = sum(32 * lengths[b].max() for b in batches)
    assert padded / lengths.sum() < 1.15  # random batches would pad ~1.7x


def test_peek_tells_the_next_draw_without_moving_the_sampler():
    s = ResumableSampler(10, seed=3)
    for _ in range(7):  # crosses epochs: 10 samples, 4 a draw, the tail of 2 dropped
        state = s.state_dict()
        ahead = s.peek(4, 1, 2)
        assert s.state_dict() == state
        assert s.next_indices(4, 1, 2).tolist() == ahead.tolist()
    assert s.epoch == 3


def test_lookahead_makes_the_next_batch_on_another_thread():
    import threading

    from distil.data import Lookahead

    made = []

    def make(key, idx):
        made.append((key, idx.tolist(), threading.current_thread() is threading.main_thread()))
        return key, idx.sum()

    la = Lookahead(make)
    try:
        a = np.arange(3)
        assert la.get((0, 0), a, (0, 1), a + 3) == ((0, 0), 3)  # nothing ahead yet: made here
        assert la.get((0, 1), a + 3, (1, 0), a + 6) == ((0, 1), 12)  # made ahead
        # The position moved (a resume): what was made ahead for (1, 0) is not used.
        assert la.get((5, 0), a + 30, (5, 1), a + 33) == ((5, 0), 93)
        assert la.get((5, 1), a + 33, (5, 2), a + 36) == ((5, 1), 102)
    finally:
        la.close()
    on_main = {key: main for key, _, main in made}
    assert on_main[(0, 0)] and not on_main[(0, 1)] and on_main[(5, 0)] and not on_main[(5, 1)]
    assert [k for k, _, _ in made if k == (0, 1)] == [(0, 1)]  # made once


def test_a_huge_single_line_is_tokenized_in_bounded_pieces(wordpiece, tmp_path):
    """A corpus whose document is one long line (a 110 MB one needed 18 GB): the tokenizer never
    sees a string longer than PIECE_CHARS, and the ids are those of the whole line."""
    import datasets

    from distil import data as data_mod
    from distil.config import DataSection
    from tests.conftest import EN_TEXT

    line = " ".join(EN_TEXT.read_text().split("\n")) * 3
    assert len(line) > 3 * data_mod.PIECE_CHARS
    seen = []

    class Spy:
        cls_token_id, sep_token_id = wordpiece.cls_token_id, wordpiece.sep_token_id

        def __call__(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return wordpiece(texts, **kw)

    whole = wordpiece(line, add_special_tokens=False)["input_ids"]
    for packing in ("pack", "lines"):
        seen.clear()
        cfg = DataSection(sources=["x"], packing=packing, max_len=32, min_len=3, cache_dir=str(tmp_path))
        seqs = data_mod.tokenize(datasets.Dataset.from_dict({"text": [line]}), Spy(), cfg)["input_ids"]
        assert seen and max(seen) <= data_mod.PIECE_CHARS
        body = [t for s in seqs for t in s[1:-1]]
        sep = wordpiece.sep_token_id
        expected = whole if packing == "lines" else (whole + [sep])[:len(body)]
        assert body == expected[:len(body)] and len(body) >= len(whole) - 30
