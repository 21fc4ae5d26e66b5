"""The downstream probe (distil/probe.py): a split by group that no group crosses, stratified
by label; a classifier whose scores behave as they must on embeddings built to be separable
or not; retention exactly 1 for a student that is its teacher; bad tables refused."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from distil.errors import UserError
from distil.probe import Probe, evaluate_probe, load_probe, score
from tests.conftest import ROOT

BROWN = ROOT / "data" / "brown" / "brown_genres.tsv"


def brown(**kw) -> Probe:
    return load_probe(BROWN, "passage", "genre", "text_id", **kw)


def test_the_split_keeps_each_text_on_one_side_and_every_genre_in_the_test_side():
    p = brown()
    assert p.describe()["rows"] == 1500 and p.describe()["classes"] == 15 and p.describe()["groups"] == 500
    train_groups, test_groups = {p.groups[i] for i in p.train}, {p.groups[i] for i in p.test}
    assert not train_groups & test_groups and len(p.train) + len(p.test) == 1500
    assert 0.15 < len(p.test) / 1500 < 0.25  # test_fraction 0.2: one fold of five
    genres_of_texts = collections.Counter(g[:2] for g in test_groups)
    assert {p.labels[i] for i in p.test} == set(p.labels)  # stratified: every genre is scored
    assert len(genres_of_texts) == 15
    again = brown()
    assert np.array_equal(again.test, p.test)  # the same split for every model and every call
    assert not np.array_equal(brown(seed=1).test, p.test)


def test_max_rows_draws_evenly_over_the_groups():
    p = brown(max_rows=600)
    per_text = collections.Counter(p.groups)
    assert len(p.texts) == 600 and len(per_text) == 500 and max(per_text.values()) - min(per_text.values()) <= 1


def test_scores_follow_the_embeddings():
    """Embeddings that hold the label give accuracy 1; embeddings that hold none give chance."""
    p = brown(max_rows=400)
    classes = sorted(set(p.labels))
    onehot = torch.tensor([[float(lab == c) for c in classes] for lab in p.labels])
    separable = score(torch.cat([onehot, torch.randn(len(p.labels), 8, generator=torch.Generator().manual_seed(0))], 1), p)
    assert separable == {"accuracy": 1.0, "macro_f1": 1.0}
    noise = score(torch.randn(len(p.labels), 16, generator=torch.Generator().manual_seed(0)), p)
    majority = max(collections.Counter(p.labels[i] for i in p.test).values()) / len(p.test)
    assert noise["accuracy"] <= majority + 0.1


def test_a_student_equal_to_its_teacher_retains_everything(teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    from distil.model_eval import load_model

    # two kinds of text a classifier tells apart from any embedding of their words; 12 documents
    table = tmp_path / "easy.tsv"
    table.write_text("text\tlabel\tdoc\n" + "".join(f"{' '.join([w] * 5)} {r}\t{k}\td{i}\n" for i in range(12)
                                                 for k, w in [("a", "the jury said"), ("b", "of the city")][i % 2:i % 2 + 1]
                                                 for r in range(3)))
    p = load_probe(table, group_column="doc")
    teacher, tokenizer = load_model(str(teacher_dir)), AutoTokenizer.from_pretrained(teacher_dir)
    same = evaluate_probe(p, teacher, load_model(str(teacher_dir)), tokenizer, max_len=32)
    assert same["teacher"] == same["student"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert same["retention"] == {"accuracy": 1.0, "macro_f1": 1.0} and same["test_rows"] == len(p.test) and same["name"] == "easy"
    # the teacher's scores, measured once, are reused as given
    given = evaluate_probe(p, None, teacher, tokenizer, max_len=32, teacher_scores={"accuracy": 0.5, "macro_f1": 0.25})
    assert given["retention"] == {"accuracy": same["student"]["accuracy"] / 0.5, "macro_f1": same["student"]["macro_f1"] / 0.25}


def test_bad_tables_are_one_message(tmp_path):
    with pytest.raises(UserError, match=r"no column 'label' \(it has: text_id, genre, passage\)"):
        load_probe(BROWN, "passage", "label")
    with pytest.raises(UserError, match="is not a .tsv/.csv/.jsonl file"):
        load_probe(tmp_path / "missing.tsv")
    few = tmp_path / "few.csv"
    few.write_text("text,label\na b c,x\nd e f,y\ng h i,x\n")
    with pytest.raises(UserError, match="too few for a 5-fold split"):
        load_probe(few)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not a JSON object"):
        load_probe(bad)
