"""The prepared-data format (distil/data/shards.py): what is written is what is read, by global
index across shards; counts and lengths equal an independent computation; a half-written,
truncated, altered or foreign folder is never read; the fingerprint follows its inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distil.config.sections import DataSection
from distil.data import shards as ts
from distil.data import shards_s3
from distil.errors import UserError
from tests.conftest import EN_TEXT


@pytest.fixture(scope="module")
def sequences(wordpiece):
    """Real token sequences of uneven lengths (each line of the corpus, at most 32 tokens): every
    20th held out."""
    lines = [x for x in EN_TEXT.read_text().splitlines() if x.strip()]
    rows = [r[:32] for r in wordpiece(lines)["input_ids"]]
    return [r for i, r in enumerate(rows) if i % 20], rows[::20]


def _write(folder, seqs, vocab, shard_tokens=500, info=None):
    train, held_out = seqs
    with ts.ShardWriter(folder, vocab, shard_tokens=shard_tokens) as w:
        for s in train:
            w.add("train", s)
        for s in held_out:
            w.add("eval", s)
        return w.close(info or {"prepared": {"x": 1}})


def test_round_trip_across_shards(tmp_path, sequences, wordpiece):
    train, held_out = sequences
    folder = _write(tmp_path / "fp", sequences, len(wordpiece))
    store = ts.PreparedData(folder, expect={"x": 1})
    assert len(store.manifest["splits"]["train"]["shards"]) > 3  # several shards at 500 tokens each
    assert store.dtype == np.dtype("<u2")
    assert len(store["train"]) == len(train) and len(store["eval"]) == len(held_out)
    order = np.random.default_rng(0).permutation(len(train))
    assert store["train"].rows(order) == [train[i] for i in order]
    assert store["eval"].rows(range(len(held_out))) == held_out
    assert store["train"].lengths().tolist() == [len(s) for s in train]
    by_hand = np.zeros(len(wordpiece), dtype=np.int64)
    for s in train:
        np.add.at(by_hand, s, 1)
    assert np.array_equal(store.counts(), by_hand)
    hist = store.manifest["splits"]["train"]["length_histogram"]
    assert {int(k): v for k, v in hist.items()} == {n: sum(len(s) == n for s in train) for n in {len(s) for s in train}}
    assert store.manifest["splits"]["train"]["tokens"] == sum(map(len, train))
    with pytest.raises(IndexError):
        store["train"].sequence(len(train))


def test_large_vocabularies_use_uint32(tmp_path):
    seqs = ([[0, 70000, 5], [100000]], [[3]])
    store = ts.PreparedData(_write(tmp_path / "fp", seqs, 120000))
    assert store.dtype == np.dtype("<u4") and store["train"].rows([0, 1]) == seqs[0]
    with ts.ShardWriter(tmp_path / "other", 10) as w, pytest.raises(ValueError, match="outside the vocabulary"):
        w.add("train", [3, 10])


def test_a_preparation_cut_short_leaves_nothing_that_is_read(tmp_path, sequences, wordpiece):
    folder = tmp_path / "fp"
    with pytest.raises(RuntimeError):
        with ts.ShardWriter(folder, len(wordpiece), shard_tokens=500) as w:
            for s in sequences[0][:100]:
                w.add("train", s)
            raise RuntimeError("killed")
    assert not folder.exists() and not list(tmp_path.iterdir())
    w = ts.ShardWriter(folder, len(wordpiece), shard_tokens=500)  # as if SIGKILLed: no close, no cleanup
    for s in sequences[0][:100]:
        w.add("train", s)
    assert not folder.exists()
    with pytest.raises(UserError, match="no MANIFEST.json"):
        ts.PreparedData(folder)
    partial = next(tmp_path.glob("fp.partial-*"))
    with pytest.raises(UserError, match="no MANIFEST.json"):
        ts.PreparedData(partial)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing", "manifest not json", "foreign"])
def test_damaged_or_foreign_folders_are_refused(tmp_path, sequences, wordpiece, damage):
    folder = _write(tmp_path / "fp", sequences, len(wordpiece))
    shard = folder / "train_00001.tokens"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "flipped":
        data = bytearray(shard.read_bytes())
        data[10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "missing":
        shard.unlink()
    elif damage == "manifest not json":
        (folder / ts.MANIFEST).write_text("{")
    with pytest.raises(UserError) as e:
        ts.PreparedData(folder, expect={"x": 2} if damage == "foreign" else {"x": 1})
    expected = {
        "truncated": "train_00001.tokens: ",
        "flipped": "train_00001.tokens: sha256",
        "missing": "train_00001.tokens: missing",
        "manifest not json": "not valid JSON",
        "foreign": "prepared from other sources",
    }[damage]
    assert expected in str(e.value)
    if damage == "flipped":
        assert ts.PreparedData(
            folder, expect={"x": 1}, check="sizes"
        )  # sizes only: what the record of a check lets a restart skip


def test_fingerprint_follows_what_the_tokens_depend_on(tmp_path, wordpiece, bytebpe):
    corpus = tmp_path / "a.txt"
    corpus.write_text("one\ntwo\n")
    data = DataSection(sources=[str(corpus)]).model_dump(mode="json")
    tok = ts.tokenizer_identity(wordpiece)
    base, inputs = ts.fingerprint(data, tok, ts.local_sources([corpus]))
    assert json.loads(json.dumps(inputs)) == inputs  # what the manifest records
    assert ts.fingerprint({**data, "cache_dir": "/elsewhere"}, tok, ts.local_sources([corpus]))[0] == base
    assert ts.fingerprint({**data, "max_len": 64}, tok, ts.local_sources([corpus]))[0] != base
    assert ts.fingerprint(data, ts.tokenizer_identity(bytebpe), ts.local_sources([corpus]))[0] != base
    corpus.write_text("one\ntwo\nthree\n")
    assert ts.fingerprint(data, tok, ts.local_sources([corpus]))[0] != base  # the source changed
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len({ts.fingerprint(data, tok, ts.local_sources([corpus]))[0], base}) == 2


def test_in_s3_published_manifest_last_and_read_shard_by_shard(tmp_path, sequences, wordpiece, s3_endpoint):
    """upload puts the manifest last; a rank's cache fetches the manifest, counts and offsets,
    then only the token shards its samples are in; a damaged object is fetched again, then refused."""
    import boto3

    from distil.storage.location import Storage

    folder = _write(tmp_path / "fp", sequences, len(wordpiece), shard_tokens=4000)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="prep")
    storage = Storage("s3://prep/data/fp", s3_endpoint)
    uploads = []
    real_client = storage.client

    class Recording:
        def __init__(self, client):
            self.client = client

        def upload_file(self, path, bucket, key, **kw):
            uploads.append(key)
            return self.client.upload_file(path, bucket, key, **kw)

    storage.client = lambda **kw: Recording(real_client(**kw))
    shards_s3.upload(folder, storage)
    storage.client = real_client
    made = [f for f in folder.iterdir() if not f.name.startswith(".")]  # (not this host's record of its check)
    assert uploads[-1] == "data/fp/MANIFEST.json" and len(uploads) == len(made)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="prep")["Contents"]}
    assert keys == {f"data/fp/{f.name}" for f in made}
    cache = tmp_path / "cache"
    store = shards_s3.open_remote(storage, cache, expect={"x": 1})
    local = cache / "prep" / "data" / "fp"
    assert not list(local.glob("*.tokens"))  # nothing read yet
    train = sequences[0]
    first = store.manifest["splits"]["train"]["shards"][0]["sequences"]
    assert store["train"].rows([0, first - 1]) == [train[0], train[first - 1]]
    assert sorted(p.name for p in local.glob("*.tokens")) == ["train_00000.tokens"]
    assert np.array_equal(store.counts(), ts.PreparedData(folder).counts())
    assert store["train"].rows(range(len(train))) == train
    # a shard altered in storage: a fresh cache fetches it twice, then refuses
    body = bytearray(s3.get_object(Bucket="prep", Key="data/fp/train_00002.tokens")["Body"].read())
    body[0] ^= 0xFF
    s3.put_object(Bucket="prep", Key="data/fp/train_00002.tokens", Body=bytes(body))
    fresh = shards_s3.open_remote(storage, tmp_path / "cache2", expect={"x": 1})
    with pytest.raises(UserError, match="train_00002.tokens does not match its manifest"):
        fresh["train"].rows(range(len(train)))
    assert not (tmp_path / "cache2" / "prep" / "data" / "fp" / "train_00002.tokens").exists()
    # a prefix without a manifest (an upload cut short) is never read
    s3.delete_object(Bucket="prep", Key="data/fp/MANIFEST.json")
    with pytest.raises(UserError, match="no MANIFEST.json"):
        shards_s3.open_remote(storage, tmp_path / "cache3")


def test_tokenizer_identity_ignores_call_time_settings(wordpiece):
    """transformers writes truncation and padding into the backend as it tokenizes: the identity
    (and so the fingerprint) must not change because the tokenizer was used."""
    import copy

    tok = copy.deepcopy(wordpiece)
    before = ts.tokenizer_identity(tok)
    tok(["a sentence to pad", "and another one"], truncation=True, max_length=8, padding="max_length")
    assert tok.backend_tokenizer.truncation is not None  # the backend did change
    assert ts.tokenizer_identity(tok) == before


def test_ranks_of_a_node_share_the_cache(tmp_path, sequences, wordpiece, s3_endpoint):
    """Several processes open the same remote store through one cache at once: each file is
    fetched under a lock, none is read half-written, every process reads every sequence."""
    import subprocess
    import sys

    import boto3

    from distil.storage.location import Storage
    from tests.conftest import ROOT

    folder = _write(tmp_path / "fp", sequences, len(wordpiece), shard_tokens=2000)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="shared")
    shards_s3.upload(folder, Storage("s3://shared/data/fp", s3_endpoint))
    code = (
        "import sys, json; from distil.data import shards_s3; from distil.storage.location import Storage;"
        f"s = shards_s3.open_remote(Storage('s3://shared/data/fp', '{s3_endpoint}'), sys.argv[1]);"
        "t = s['train']; print(json.dumps(t.rows(range(len(t)))))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert all(json.loads(o) == sequences[0] for o, _ in outs)
