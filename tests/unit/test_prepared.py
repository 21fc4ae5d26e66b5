"""A run's data is prepared once (distil/prepared.py): later starts open it without
tokenizing; changed sources, tokenizer or data section give a new folder, never a mix; a
damaged folder is refused; a corpus too small for a batch writes nothing."""

from __future__ import annotations

import shutil

import pytest

from distil import prepared
from distil import token_store as ts
from distil.config import DistilConfig
from distil.data import load_documents, split_eval, tokenize
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
    # the same sequences, in the same order, as the tokenization path gives
    train, held_out = split_eval(tokenize(load_documents(cfg.data), tok, cfg.data), cfg.data, cfg.run.seed)
    assert store["train"].rows(range(len(train))) == list(train["input_ids"])
    assert store["eval"].rows(range(len(held_out))) == list(held_out["input_ids"])
    # a later start (another rank, a restart, another run of the same data) never tokenizes
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: pytest.fail("tokenized again"))
    again = prepared.open_prepared(cfg, tok, per_step=8, log=said.append)
    assert again.folder == store.folder and len(said) == 1
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
