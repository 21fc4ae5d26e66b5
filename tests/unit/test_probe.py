"""The downstream probe (distil/eval/probe.py): folds by group that no group crosses, stratified
by label, every row held out once; a classifier whose scores behave as they must on
embeddings built to be separable or not; retention exactly 1 for a student that is its
teacher; bad tables refused."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from distil.errors import UserError
from distil.eval.probe import Probe, evaluate_probe, load_probe, score
from tests.conftest import ROOT

BROWN = ROOT / "data" / "brown" / "brown_genres.tsv"


def brown(**kw) -> Probe:
    return load_probe(BROWN, "passage", "genre", "text_id", **kw)


def test_every_row_is_held_out_once_by_a_fold_that_keeps_its_text_whole():
    p = brown()
    assert p.describe() == {"name": "brown_genres", "rows": 3000, "classes": 15, "groups": 500, "folds": 5}
    held_out = np.concatenate([test for _, test in p.folds])
    assert sorted(held_out.tolist()) == list(range(3000))  # each row predicted exactly once
    for train, test in p.folds:
        assert not {p.groups[i] for i in train} & {p.groups[i] for i in test}
        assert len(train) + len(test) == 3000 and 0.15 < len(test) / 3000 < 0.25  # test_fraction 0.2: five folds
        assert {p.labels[i] for i in test} == set(p.labels)  # stratified: every genre is scored in every fold
    again = brown()
    assert all(
        np.array_equal(a[1], b[1]) for a, b in zip(again.folds, p.folds)
    )  # the same folds for every model and call
    assert not np.array_equal(brown(seed=1).folds[0][1], p.folds[0][1])
    assert len(brown(test_fraction=0.25).folds) == 4


def test_max_rows_draws_evenly_over_the_groups():
    p = brown(max_rows=600)
    per_text = collections.Counter(p.groups)
    assert len(p.texts) == 600 and len(per_text) == 500 and max(per_text.values()) - min(per_text.values()) <= 1


def test_scores_follow_the_embeddings(tmp_path):
    """Embeddings that hold the label give accuracy 1; embeddings that hold none give chance."""
    p = brown(max_rows=400)
    classes = sorted(set(p.labels))
    onehot = torch.tensor([[float(lab == c) for c in classes] for lab in p.labels])
    separable = score(
        torch.cat([onehot, torch.randn(len(p.labels), 8, generator=torch.Generator().manual_seed(0))], 1), p
    )
    assert separable == {"accuracy": 1.0, "macro_f1": 1.0}
    noise = score(torch.randn(len(p.labels), 16, generator=torch.Generator().manual_seed(0)), p)
    majority = max(collections.Counter(p.labels).values()) / len(p.labels)
    assert noise["accuracy"] <= majority + 0.1
    # An embedding that names the text (its genre follows) scores only if a text's rows were on
    # both sides of a fold: the folds by group leave it at chance.
    lines = BROWN.read_text(encoding="utf-8").splitlines()  # every 5th text, its 6 rows: 100 texts of 15 genres
    (tmp_path / "b.tsv").write_text(
        "\n".join(lines[:1] + [x for i, x in enumerate(lines[1:]) if i // 6 % 5 == 0]) + "\n"
    )
    few = load_probe(tmp_path / "b.tsv", "passage", "genre", "text_id")
    texts = sorted(set(few.groups))
    names_the_text = torch.tensor([[float(g == t) for t in texts] for g in few.groups])
    assert (
        score(names_the_text, few)["accuracy"] <= max(collections.Counter(few.labels).values()) / len(few.labels) + 0.1
    )


def test_a_student_equal_to_its_teacher_retains_everything(teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    from distil.eval.compare import load_model

    # two kinds of text a classifier tells apart from any embedding of their words; 12 documents
    table = tmp_path / "easy.tsv"
    table.write_text(
        "text\tlabel\tdoc\n"
        + "".join(
            f"{' '.join([w] * 5)} {r}\t{k}\td{i}\n"
            for i in range(12)
            for k, w in [("a", "the jury said"), ("b", "of the city")][i % 2 : i % 2 + 1]
            for r in range(3)
        )
    )
    p = load_probe(table, group_column="doc")
    teacher, tokenizer = load_model(str(teacher_dir)), AutoTokenizer.from_pretrained(teacher_dir)
    same = evaluate_probe(p, teacher, load_model(str(teacher_dir)), tokenizer, max_len=32)
    assert same["teacher"] == same["student"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert (
        same["retention"] == {"accuracy": 1.0, "macro_f1": 1.0}
        and same["rows"] == len(p.texts)
        and same["name"] == "easy"
    )
    # the teacher's scores, measured once, are reused as given
    given = evaluate_probe(p, None, teacher, tokenizer, max_len=32, teacher_scores={"accuracy": 0.5, "macro_f1": 0.25})
    assert given["retention"] == {
        "accuracy": same["student"]["accuracy"] / 0.5,
        "macro_f1": same["student"]["macro_f1"] / 0.25,
    }


def test_bad_tables_are_one_message(tmp_path):
    with pytest.raises(UserError, match=r"no column 'label' \(it has: text_id, genre, passage\)"):
        load_probe(BROWN, "passage", "label")
    with pytest.raises(UserError, match="probe file .*missing.tsv does not exist"):  # (issue 26: not "not a .tsv file")
        load_probe(tmp_path / "missing.tsv")
    (tmp_path / "table.xlsx").write_text("x")
    with pytest.raises(UserError, match="is not a .tsv/.csv/.jsonl file"):
        load_probe(tmp_path / "table.xlsx")
    few = tmp_path / "few.csv"
    few.write_text("text,label\na b c,x\nd e f,y\ng h i,x\n")
    with pytest.raises(UserError, match="too few for a 5-fold split"):
        load_probe(few)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not a JSON object"):
        load_probe(bad)

    listed = tmp_path / "listed.jsonl"  # issue 27: a line that is JSON but not an object ended in AttributeError
    listed.write_text('{"text": "a", "label": "x"}\n["a", "x"]\n')
    with pytest.raises(UserError, match="listed.jsonl:2 is not a JSON object"):
        load_probe(listed)


def _table(tmp_path, name: str, rows: list[tuple[str, str]], sep: str) -> Path:
    path = tmp_path / name
    path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def test_a_tsv_text_that_begins_with_a_quote_is_read_as_it_is(tmp_path):
    """Issue 27: the TSV reader took `"` as a quote and merged rows up to the next one (20 rows
    read as 12, silently). A .tsv has no quoting: every line is one row, texts unchanged."""
    texts = [
        f'"Quoted" opening {i}' if i % 3 == 0 else f'"unbalanced {i}' if i % 5 == 1 else f'plain, {i} "inner" quotes'
        for i in range(20)
    ]
    rows = [(t, "ab"[i % 2]) for i, t in enumerate(texts)]
    probe = load_probe(_table(tmp_path, "q.tsv", rows, "\t"))
    assert probe.texts == texts and probe.labels == [lab for _, lab in rows]


def test_a_row_with_another_number_of_fields_is_refused_by_line(tmp_path):
    path = _table(tmp_path, "t.tsv", [(f"text {i}", "ab"[i % 2]) for i in range(20)], "\t")
    path.write_text(path.read_text() + "one\ttoo\tmany\n")
    with pytest.raises(UserError, match="t.tsv:22 has 3 fields, the header 2"):
        load_probe(path)
    csv_path = tmp_path / "t.csv"  # a .csv keeps RFC 4180 quoting: a quoted comma is one field
    csv_path.write_text("text,label\n" + "".join(f'"a, b {i}",{"ab"[i % 2]}\n' for i in range(20)))
    assert load_probe(csv_path).texts[3] == "a, b 3"
