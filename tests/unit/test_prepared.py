"""A run's data is prepared once (distil/prepared.py): later starts open it without
tokenizing; changed sources, tokenizer or data section give a new folder, never a mix; a
damaged folder is refused; a corpus too small for a batch writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from distil import prepared
from distil import token_store as ts
from distil.config import DistilConfig
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
    expected = [[tok.cls_token_id, *stream[i:i + 30], tok.sep_token_id] for i in range(0, len(stream) - 29, 30)]
    train, held_out = (store[s].rows(range(len(store[s]))) for s in ("train", "eval"))
    assert sorted(train + held_out) == sorted(expected)
    assert len(held_out) == min(cfg.data.eval_max_sequences, round(cfg.data.eval_fraction * len(expected)))
    # a later start (another rank, a restart, another run of the same data) never tokenizes
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: pytest.fail("tokenized again"))
    said.clear()
    again = prepared.open_prepared(cfg, tok, per_step=8, log=said.append)
    assert again.folder == store.folder and said == []
    other_run = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "other"}),
                                       "train": cfg.train.model_copy(update={"max_steps": 99})})
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
    hub = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": ["json"], "hub_kwargs": {"data_files": str(rows)},
                                                                    "cache_dir": str(tmp_path / "hf")})})
    first = prepared.open_prepared(hub, tok, per_step=8, log=lambda _: None)
    n_first = len(first["train"]) + len(first["eval"])
    with open(rows, "a") as f:
        f.write("".join(json.dumps({"text": x}) + "\n" for x in EN_TEXT.read_text().splitlines()[300:600]))
    os.utime(rows, (rows.stat().st_atime, rows.stat().st_mtime + 5))  # (a coarse-mtime file system)
    second = prepared.open_prepared(hub, tok, per_step=8, log=lambda _: None)
    assert second.folder != first.folder and len(second["train"]) + len(second["eval"]) > n_first

def test_damaged_prepared_data_is_refused(setup):
    cfg, _, tok = setup
    store = prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)
    shard = store.folder / "train_00000.tokens"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="train_00000.tokens: .* bytes, expected"):
        prepared.open_prepared(cfg, tok, per_step=8, log=lambda _: None)


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distil import corpus as corpus_mod
    from tests.conftest import PL_TEXT

    cfg, corpus, tok = setup
    folder = corpus.parent / "sources"
    folder.mkdir()
    shutil.move(corpus, folder / "a.txt")
    pq.write_table(pa.table({"text": PL_TEXT.read_text().splitlines()}), folder / "b.parquet", row_group_size=50)
    hub = corpus.parent / "hub.jsonl"  # a data set through `datasets.load_dataset` ("json", offline): Ray's from_huggingface
    hub.write_text("".join(json.dumps({"text": x}) + "\n" for x in EN_TEXT.read_text().splitlines()[:300]))
    monkeypatch.setattr(corpus_mod, "RANGE_BYTES", 4096)  # ~25 ranges of the text file, 6 row groups
    made = {}
    for use_ray in (False, True):
        data = cfg.data.model_copy(update={"sources": [str(folder), "json"], "hub_kwargs": {"data_files": str(hub)}})
        run = cfg.model_copy(update={"data": data,
                                     "storage": cfg.storage.model_copy(update={"uri": str(tmp_path / f"ray_{use_ray}")})})
        store = prepared.open_prepared(run, tok, per_step=8, log=lambda _: None, use_ray=use_ray, workers=2)
        made[use_ray] = (store.folder.name, store.files())
    assert made[True] == made[False]
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
