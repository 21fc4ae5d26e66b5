"""Reading sources (distil/data/corpus.py), tokenizing, packing and the held-out split
(distil/data/sequences.py), each against an independent computation; and the resumable sampler."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distil.data import corpus
from distil.data.batches import ResumableSampler
from distil.data.corpus import Reading
from distil.data.sequences import HeldOut, Packer, token_ids, tokenizer_spec
from distil.errors import UserError
from tests.conftest import EN_TEXT


def _docs(path, **kw):
    """Every document of a source, read range by range as preparation reads it."""
    reading = Reading(**kw)
    listing = [{"name": str(f), "size": f.stat().st_size} for f in corpus.local_files(str(path))]
    return [t for segment in corpus.plan(None, reading, listing) for r in segment for t in corpus.read(r, reading)]


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=30),
    crlf=st.booleans(),
    range_bytes=st.integers(1, 40),
)
def test_ranges_read_every_line_once(tmp_path_factory, lines, crlf, range_bytes):
    """Cut into ranges of any size -- through multi-byte characters, at newlines -- a file reads
    as its lines, each once, in order; \r\n ends a line like \n."""
    lines = [x.replace("\n", " ").replace("\r", " ") for x in lines]
    f = tmp_path_factory.mktemp("ranges") / "c.txt"
    f.write_bytes(("\r\n" if crlf else "\n").join(lines).encode())
    ranges = corpus.file_ranges(str(f), f.stat().st_size, False, Reading(), range_bytes=range_bytes)
    got = [t for r in ranges for t in corpus.read(r, Reading())]
    assert got == [x for x in lines if x.strip()]


def test_tokenizing_equals_the_tokenizer_of_each_text(wordpiece, bytebpe):
    texts = [x for x in EN_TEXT.read_text().splitlines() if x.strip()][:200] + ["word " * 40000]  # one > PIECE_CHARS
    for tok in (wordpiece, bytebpe):
        flat, lens = token_ids(tokenizer_spec(tok), texts)
        expected = tok(texts, add_special_tokens=False)["input_ids"]
        assert lens.tolist() == [len(e) for e in expected]
        assert flat.tolist() == [t for e in expected for t in e]


def _by_hand_pack(docs, cls, sep, body):
    stream = [t for d in docs if d for t in [*d, sep]]
    return [[cls, *stream[i : i + body], sep] for i in range(0, len(stream) - body + 1, body)]


def _by_hand_lines(docs, cls, sep, body, min_len):
    return [
        [cls, *d[i : i + body], sep]
        for d in docs
        for i in range(0, len(d), body)
        if len(d[i : i + body]) + 2 >= min_len
    ]


def _run(packer, docs, cut):
    """The packer fed the documents in batches cut at `cut`: sequences as lists."""
    out = []
    for a, b in zip([0, *cut], [*cut, len(docs)]):
        part = docs[a:b]
        flat = np.array([t for d in part for t in d], dtype=np.int32)
        seqs, lens = packer(flat, np.array([len(d) for d in part], dtype=np.int64))
        out += [x.tolist() for x in np.split(seqs, np.cumsum(lens)[:-1])] if len(lens) else []
    return out


@pytest.mark.parametrize("cut", [[], [1], [3, 4, 50], list(range(1, 120, 7))])
def test_packing_equals_a_by_hand_packing_however_the_batches_are_cut(wordpiece, cut):
    lines = [x for x in EN_TEXT.read_text().splitlines()][:120] + [""]
    docs = wordpiece(lines, add_special_tokens=False)["input_ids"]
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    assert _run(Packer(cls, sep, 32, "pack", 12), docs, cut) == _by_hand_pack(docs, cls, sep, 30)
    assert _run(Packer(cls, sep, 16, "lines", 6), docs, cut) == _by_hand_lines(docs, cls, sep, 14, 6)


def test_jsonl_json_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(json.dumps({"body": f"json line {i}"}) for i in range(3)) + "\n\n")
    (d / "b.json").write_text(json.dumps([{"body": "array one"}, {"body": ""}, {"body": "array two"}]))
    pq.write_table(
        pa.table({"body": ["parquet one", None, "parquet two", "parquet three"]}),
        d / "sub" / "c.parquet",
        row_group_size=2,
    )
    assert _docs(d, text_field="body") == [
        *(f"json line {i}" for i in range(3)),
        "array one",
        "array two",
        "parquet one",
        "parquet two",
        "parquet three",
    ]
    with pytest.raises(UserError, match="without a 'missing' field"):
        _docs(d / "a.jsonl", text_field="missing")
    with pytest.raises(UserError, match="no column 'missing'"):
        _docs(d / "sub", text_field="missing")


def test_missing_source_empty_lines_and_bad_bytes(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        corpus.local_files(str(tmp_path / "nope.txt"))
    f = tmp_path / "blank.txt"
    f.write_text("\n  \nreal text\n\n")
    assert _docs(f) == ["real text"]
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"fine line\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"latin.txt is not UTF-8 text \(byte 13 "):
        _docs(bad)


def _split(seqs, fraction, cap, seed, cut):
    h = HeldOut(fraction, cap, seed)
    train = []
    for a, b in zip([0, *cut], [*cut, len(seqs)]):
        flat, lens = h.feed(np.arange(a, b, dtype=np.int32), np.ones(b - a, dtype=np.int64))
        train += flat.tolist()
    (rest, _), (held, _) = h.finish()
    return train + rest.tolist(), held.tolist()


@pytest.mark.parametrize("cut", [[], [5], list(range(3, 1000, 11))])
def test_held_out_is_the_bottom_k_of_seeded_draws_however_the_batches_are_cut(cut):
    """Sequence i (here: the token i) is held out when its draw is among the n_eval smallest of
    one seeded stream of draws -- the same set whatever the batches."""
    n, fraction, cap = 1000, 0.05, 30
    train, held = _split(list(range(n)), fraction, cap, 7, cut)
    u = np.random.default_rng([7, 0x5E1D]).random(n)
    assert held == sorted(np.argsort(u, kind="stable")[: min(cap, round(fraction * n))].tolist())
    assert sorted(train + held) == list(range(n)) and not set(train) & set(held)
    assert _split(list(range(n)), fraction, cap, 8, cut)[1] != held  # the seed decides
    assert _split(list(range(n)), 0.01, cap, 7, cut)[1] == sorted(np.argsort(u, kind="stable")[:10].tolist())
    assert _split(list(range(2)), 0.01, cap, 7, cut=[])[1] != []  # at least one when there are two
    assert _split(list(range(n)), 0.0, cap, 7, cut)[1] == []


def _take(sampler, world, local, steps):
    """Global batches as `world` workers see them: each worker holds its own copy of the sampler."""
    copies = [sampler] + [
        ResumableSampler(sampler.n, sampler.seed, sampler.lengths, sampler.group) for _ in range(world - 1)
    ]
    for c in copies[1:]:
        c.load_state_dict(sampler.state_dict())
    return [
        np.concatenate([c.next_indices(world * local, r, local) for r, c in enumerate(copies)]) for _ in range(steps)
    ]


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

    from distil.data.batches import Lookahead

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


def test_a_huge_single_line_is_tokenized_in_bounded_pieces(wordpiece, monkeypatch):
    """A corpus whose document is one long line (a 110 MB one needed 18 GB): the tokenizer never
    sees a string longer than PIECE_CHARS, and the ids are those of the whole line."""
    from distil.data import sequences

    line = " ".join(EN_TEXT.read_text().split("\n")) * 3
    assert len(line) > 3 * sequences.PIECE_CHARS
    spec = tokenizer_spec(wordpiece)
    real, seen = sequences._tokenizer(spec), []

    class Spy:
        def encode_batch_fast(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return real.encode_batch_fast(texts, **kw)

    monkeypatch.setattr(sequences, "_tokenizer", lambda _: Spy())
    flat, lens = token_ids(spec, [line])
    assert seen and max(seen) <= sequences.PIECE_CHARS
    assert flat.tolist() == wordpiece(line, add_special_tokens=False)["input_ids"] and lens.tolist() == [len(flat)]


def _steps(n: int, world: int, micro: int, global_batch: int, steps: int, step_size: int | None) -> list[list[int]]:
    """The samples of each optimizer step as `world` workers train them, micro-batches of `micro`
    accumulated to `global_batch` (each worker with its own copy of the sampler)."""
    copies = [ResumableSampler(n, seed=7, step_size=step_size) for _ in range(world)]
    gas = global_batch // (micro * world)
    return [
        sorted(i for _ in range(gas) for r, c in enumerate(copies) for i in c.next_indices(micro * world, r, micro))
        for _ in range(steps)
    ]


def test_every_worker_count_trains_the_same_samples_in_each_step_across_epochs():
    """An elastic run trains a step on 1, 2 or 4 workers (gradient accumulation 4, 2, 1). With 100
    samples and a step of 16 the epoch's tail is 4: one worker's micro-batch of 4 still fits,
    four workers' micro-batch of 16 does not. The epoch ends where a whole step no longer fits,
    so every count trains the same samples in every step (without it, they part at the first
    epoch's end, which is what the sampler did before)."""
    one, two, four = (_steps(100, w, 4, 16, 20, step_size=16) for w in (1, 2, 4))
    assert one == two == four
    assert all(len(set(s)) == 16 for s in one)
    old = [_steps(100, w, 4, 16, 20, step_size=None) for w in (1, 4)]
    assert old[0][:6] == old[1][:6] and old[0][6] != old[1][6]  # step 7 crosses the epoch's end
