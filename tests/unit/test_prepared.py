"""A run's data is prepared once (distil/data/prepared.py): later starts open it without
tokenizing; changed sources, tokenizer or data section give a new folder, never a mix; a
damaged folder is never trained on; a corpus too small for a batch writes nothing."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from distil.config.schema import DistilConfig
from distil.data import prepared
from distil.data import shards as ts
from distil.errors import UserError
from tests.conftest import EN_TEXT, base_config


@pytest.fixture()
def setup(tmp_path, teacher_dir, wordpiece):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(EN_TEXT, corpus)
    raw = base_config(teacher_dir, tmp_path)
    raw["data"]["sources"] = [str(corpus)]
    return DistilConfig.model_validate(raw), corpus, wordpiece


def test_prepared_once_then_opened(setup, monkeypatch, tmp_path):
    cfg, corpus, tok = setup
    said = []
    store = prepared.open_prepared(cfg, tok, per_step=8, log=said.append)
    assert said and "preparing the data once" in said[0]
    folders = list((tmp_path / "runs" / "data").iterdir())
    assert [f.name for f in folders] == [store.folder.name] and (store.folder / ts.MANIFEST).is_file()
    # every sequence of a by-hand packing of the corpus, each once, in train or held out
    docs = tok([x for x in corpus.read_text().splitlines() if x.strip()], add_special_tokens=False)["input_ids"]
    stream = [t for d in docs if d for t in [*d, tok.sep_token_id]]
    expected = [[tok.cls_token_id, *stream[i : i + 30], tok.sep_token_id] for i in range(0, len(stream) - 29, 30)]
    train, held_out = (store[s].rows(range(len(store[s]))) for s in ("train", "eval"))
    assert sorted(train + held_out) == sorted(expected)
    assert len(held_out) == min(cfg.data.eval_max_sequences, round(cfg.data.eval_fraction * len(expected)))
    # a later start (another rank, a restart, another run of the same data) never tokenizes
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: pytest.fail("tokenized again"))
    said.clear()
    again = prepared.open_prepared(cfg, tok, per_step=8, log=said.append)
    assert again.folder == store.folder and said == []
    other_run = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"name": "other"}),
            "train": cfg.train.model_copy(update={"max_steps": 99}),
        }
    )
    assert prepared.open_prepared(other_run, tok, per_step=8).folder == store.folder


def test_changed_inputs_give_a_new_folder(setup, tmp_path, bytebpe):
    cfg, corpus, tok = setup
    first = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None).folder
    with open(corpus, "a") as f:
        f.write("a sentence added after the data was prepared\n")
    second = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None).folder
    longer = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_len": 48})})
    third = prepared.open_prepared(longer, tok, per_step=8, log=lambda _: None).folder
    assert len({first, second, third}) == 3 and all((f / ts.MANIFEST).is_file() for f in (first, second, third))


def test_a_changed_hub_data_set_gets_a_new_folder(setup, tmp_path):
    """A hub data set is fingerprinted by what `datasets` resolves (the repository's commit, the
    data files with their ETags or mtimes), not only by its name and arguments: the same
    arguments over changed data are never opened as the old preparation."""
    import os

    cfg, _, tok = setup
    rows = tmp_path / "hub.jsonl"
    rows.write_text("".join(json.dumps({"text": x}) + "\n" for x in EN_TEXT.read_text().splitlines()[:300]))
    hub = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"sources": ["json"], "hub_kwargs": {"data_files": str(rows)}, "cache_dir": str(tmp_path / "hf")}
            )
        }
    )
    first = prepared.open_prepared(hub, tok, per_step=8, log=lambda _: None)
    n_first = len(first["train"]) + len(first["eval"])
    with open(rows, "a") as f:
        f.write("".join(json.dumps({"text": x}) + "\n" for x in EN_TEXT.read_text().splitlines()[300:600]))
    os.utime(rows, (rows.stat().st_atime, rows.stat().st_mtime + 5))  # (a coarse-mtime file system)
    second = prepared.open_prepared(hub, tok, per_step=8, log=lambda _: None)
    assert second.folder != first.folder and len(second["train"]) + len(second["eval"]) > n_first


def _damage(folder, how: str, vocab: int) -> None:
    """Damage a prepared folder the ways issue 27 found trained on, or crashing."""
    import hashlib

    import numpy as np

    shard, held_out, manifest = folder / "train_00000.tokens", folder / "eval_00000.tokens", folder / ts.MANIFEST
    if how == "every id + 1":
        ids = np.fromfile(shard, dtype="<u2")
        (ids + 1).astype("<u2").tofile(shard)  # the same size, other tokens
    elif how == "zero-filled":
        shard.write_bytes(bytes(shard.stat().st_size))
    elif how == "held-out ids edited":
        ids = np.fromfile(held_out, dtype="<u2")
        ids[:5] = ids[5:10]
        ids.tofile(held_out)
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "manifest deleted":
        manifest.unlink()
    elif how == "id outside the vocabulary, manifest re-hashed":
        ids = np.fromfile(shard, dtype="<u2")
        ids[3] = vocab + 5
        ids.tofile(shard)
        m = json.loads(manifest.read_text())
        m["splits"]["train"]["shards"][0]["files"][shard.name]["sha256"] = hashlib.sha256(
            shard.read_bytes()
        ).hexdigest()
        manifest.write_text(json.dumps(m))
    elif how == "dtype edited":
        m = json.loads(manifest.read_text())
        m["dtype"] = "<u4"
        manifest.write_text(json.dumps(m))


DAMAGE = {
    "every id + 1": "train_00000.tokens: sha256 differs",
    "zero-filled": "train_00000.tokens: sha256 differs",
    "held-out ids edited": "eval_00000.tokens: sha256 differs",
    "truncated": "train_00000.tokens: ",
    "manifest deleted": "no MANIFEST.json",
    "dtype edited": "dtype <u4 does not fit vocab_size",
    "id outside the vocabulary, manifest re-hashed": "train_00000.tokens: holds token id",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_local_data_is_never_trained_on(setup, how):
    """Issue 27: local prepared data was opened with sizes checked only -- flipped or zeroed
    tokens, edited held-out ids trained on silently; an id past the vocabulary or an edited
    dtype crashed; a deleted manifest made every later start fail (OSError). Now a worker that
    is handed the data refuses it with one message, and a start that prepares (the driver, a
    local run, `distil prepare`) says what is damaged and prepares it again: the same sequences."""
    cfg, _, tok = setup
    store = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)
    before = {s: store[s].rows(range(len(store[s]))) for s in ("train", "eval")}
    fingerprint = store.manifest["fingerprint"]
    _damage(store.folder, how, len(tok))
    with pytest.raises(UserError) as refused:  # a Ray worker: the driver prepared it, it only opens it
        prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None, fingerprint=fingerprint)
    assert DAMAGE[how] in str(refused.value) and "prepare" in refused.value.fix
    said = []
    again = prepared.open_prepared(cfg, tok, per_step=8, log=said.append)
    assert said[0].startswith("warning: ") and DAMAGE[how] in said[0] and said[0].endswith("preparing it again")
    assert "preparing the data once" in said[1]
    assert {s: again[s].rows(range(len(again[s]))) for s in ("train", "eval")} == before
    assert ts.PreparedData(again.folder, check="full").manifest["fingerprint"] == fingerprint


def test_a_check_is_recorded_once_per_host_and_a_changed_file_is_checked_again(setup, monkeypatch):
    """Hashing a corpus at every restart of every rank would cost minutes: the first open on a
    host hashes and records it; later opens trust the files while their stat is unchanged. A
    file written since -- even with its mtime set back -- has another ctime, and is hashed again."""
    import os

    from distil.data import shard_check

    cfg, _, tok = setup
    store = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)
    assert list(store.folder.glob(".verified-*.json"))  # the writer's, or the first open's
    time.sleep(shard_check.RACY_NS / 1e9 + 0.1)  # past the coarse-clock margin: no file is "racy" now
    prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)  # (re-recorded after the files' age)
    real_check = shard_check.check
    monkeypatch.setattr(shard_check, "check", lambda *a, **k: pytest.fail("hashed again"))
    prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)  # trusted: nothing changed
    ts.PreparedData(store.folder, expect=store.manifest["prepared"])
    shard = store.folder / "eval_00000.tokens"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as it was: only the ctime tells
    hashed = []
    monkeypatch.setattr(shard_check, "check", lambda *a, **k: hashed.append(1) or real_check(*a, **k))
    with pytest.raises(UserError, match="eval_00000.tokens: sha256 differs"):
        ts.PreparedData(store.folder)
    assert hashed


def test_a_file_changed_in_the_tick_its_check_was_recorded_is_checked_again(setup):
    """On a file system with a coarse clock (1 s on ext3, a jiffy on older kernels), a change in
    the same tick as the record of a check leaves the file's stat as recorded. As git does with
    its "racy" files, a file changed within RACY_NS of its record is hashed all the same."""
    from distil.data import shard_check

    cfg, _, tok = setup
    store = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)
    shard = store.folder / "train_00000.tokens"
    shard.write_bytes(bytes(shard.stat().st_size))
    raw = (store.folder / ts.MANIFEST).read_bytes()
    shard_check.record_check(store.folder, raw, store.manifest)  # as if recorded in the tick of the change
    with pytest.raises(UserError, match="train_00000.tokens: sha256 differs"):
        ts.PreparedData(store.folder)


def test_too_small_a_corpus_writes_nothing(setup, tmp_path):
    cfg, _, tok = setup
    with pytest.raises(UserError, match="fewer than one batch of 100000"):
        prepared.open_prepared(cfg, tok, per_step=100000, log=lambda _: None)
    assert not (tmp_path / "runs").exists()


@pytest.fixture()
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_data_prepares_exactly_what_one_process_does(setup, tmp_path, local_ray, monkeypatch):
    """Ray Data tasks on a local Ray instance (the corpus cut into many ranges, read and
    tokenized in parallel, two kinds of files, and a `datasets` data set) write the same shards,
    byte for byte, as this process does alone."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distil.data import corpus as corpus_mod
    from distil.data import ray_tokenize
    from tests.conftest import PL_TEXT

    cfg, corpus, tok = setup
    folder = corpus.parent / "sources"
    folder.mkdir()
    shutil.move(corpus, folder / "a.txt")
    pq.write_table(pa.table({"text": PL_TEXT.read_text().splitlines()}), folder / "b.parquet", row_group_size=50)
    hub = (
        corpus.parent / "hub.jsonl"
    )  # a data set through `datasets.load_dataset` ("json", offline): Ray's from_huggingface
    hub.write_text("".join(json.dumps({"text": x}) + "\n" for x in EN_TEXT.read_text().splitlines()[:300]))
    monkeypatch.setattr(corpus_mod, "RANGE_BYTES", 4096)  # ~25 ranges of the text file, 6 row groups
    monkeypatch.setattr(corpus_mod, "HUB_BATCH_ROWS", 64)  # the 300 records: 5 batches in 3 windows
    monkeypatch.setattr(ray_tokenize, "HUB_WINDOW_BATCHES", 2)
    # Nothing may go to the default `datasets` cache: data.cache_dir is where a run's data goes.
    # (Ray's from_huggingface called load_dataset("json") again without our data_files or
    # cache_dir: it globbed the working directory as JSON for a minute and cached there.)
    default_cache = tmp_path / "default-hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", default_cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(default_cache))
    made = {}
    for use_ray in (False, True):
        data = cfg.data.model_copy(update={"sources": [str(folder), "json"], "hub_kwargs": {"data_files": str(hub)}})
        run = cfg.model_copy(
            update={"data": data, "storage": cfg.storage.model_copy(update={"uri": str(tmp_path / f"ray_{use_ray}")})}
        )
        store = prepared.open_prepared(run, tok, per_step=8, log=lambda _: None, use_ray=use_ray, workers=2)
        made[use_ray] = (store.folder.name, store.files())
    assert made[True] == made[False]
    assert not default_cache.exists(), sorted(default_cache.rglob("*"))[:5]
    (folder / "c.txt").write_bytes(b"fine\ncaf\xe9\n")  # raised in a Ray task: the same one message
    with pytest.raises(UserError, match=r"c.txt is not UTF-8 text \(byte 8 "):
        prepared.open_prepared(run, tok, per_step=8, log=lambda _: None, use_ray=True)


def test_a_ray_worker_opens_the_drivers_data_by_fingerprint(setup, tmp_path):
    """A worker is handed the fingerprint: it lists no source (its node may not see them) and
    prepares nothing, but still refuses data made by another tokenizer or data section."""
    cfg, corpus, tok = setup
    fp = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None).folder.name
    corpus.unlink()  # not on this node
    store = prepared.open_prepared(cfg, tok, per_step=8, fingerprint=fp)
    assert store.folder.name == fp and len(store["train"]) > 8
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_len": 48})})
    with pytest.raises(UserError, match="differs in: data"):
        prepared.open_prepared(other, tok, per_step=8, fingerprint=fp)
    with pytest.raises(UserError, match="holds no prepared data"):
        prepared.open_prepared(cfg, tok, per_step=8, fingerprint="0" * 20)


def test_a_source_reached_through_a_link_without_a_suffix(setup, tmp_path):
    """Issue 27: the hub's cache names a file snapshots/<commit>/train.txt, a link to
    blobs/<sha>; the source listing resolved the link and lost the suffix that says the format
    (KeyError: ''). The file is read as named, with the same sequences as the file itself."""
    cfg, corpus, tok = setup
    blob = tmp_path / "hub" / "blobs" / "9f86d081884c7d659a2feaa0c55ad015"
    blob.parent.mkdir(parents=True)
    shutil.copy(corpus, blob)
    link = tmp_path / "hub" / "snapshots" / "0123abcd" / "train.txt"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    linked = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [str(link.parent)]})})
    via_link = prepared.open_prepared(linked, tok, per_step=8, log=lambda _: None)
    direct = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)
    assert via_link.manifest["prepared"]["sources"][0]["name"] == str(link)
    assert all(
        via_link[s].rows(range(len(via_link[s]))) == direct[s].rows(range(len(direct[s]))) for s in ("train", "eval")
    )
