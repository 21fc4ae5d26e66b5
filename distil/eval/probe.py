"""Downstream probes on frozen representations: how much of its teacher's quality a student keeps.

A probe is a labelled text set: a .tsv, .csv or .jsonl file with a text column, a label
column and, optionally, a group column (Brown's `text_id`: the passages of one text). Its
rows are cross-validated by group: round(1 / test_fraction) folds, stratified by label
(scikit-learn's StratifiedGroupKFold), each fold's groups held out once -- no group has rows
on both sides of a fold, so a classifier cannot score by recognising a text it has seen.
Each model embeds every text once, frozen (mean-pooled last hidden states, as `agreement`
does); per fold, a logistic regression (on standardised embeddings, its L2 strength chosen
by a 3-fold cross-validation on the fold's train side, by group as well) is fit on the train
side and predicts the held-out rows. Every row is so predicted once, by a classifier that
never saw its text, and the scores are over all rows: five times the test rows of one split
for the same embedding cost (a one-fold probe of Brown's 500 texts scored 100 of them, and
three passages moved the retention by 4 points). Retention = the student's accuracy ÷ the
teacher's, as DistilBERT reported "97% of BERT's GLUE score". The folds, the classifier and
its seed are the same for both models: the only difference is the representation.

scikit-learn comes with the `eval` extra (`pip install distil-run[eval]`).
"""

from __future__ import annotations

# Imports inside functions: scikit-learn is the optional `eval` extra: imported where a probe is
# fit.
import csv
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distil.data.batches import collate
from distil.errors import UserError
from distil.eval.measures import embed

FORMATS = (".tsv", ".csv", ".jsonl")


@dataclass
class Probe:
    name: str  # the file's stem, e.g. brown_genres
    texts: list[str]
    labels: list[str]
    groups: list[str]
    folds: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)  # (train rows, held-out rows) per fold

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rows": len(self.texts),
            "classes": len(set(self.labels)),
            "groups": len(set(self.groups)),
            "folds": len(self.folds),
        }


def _rows(path: Path) -> list[dict]:
    """The rows of a probe file. A .tsv has no quoting (IANA's text/tab-separated-values: a
    field holds no tab or newline), so a text that begins with a quote is read as it is; a .csv
    is RFC 4180 (quoted fields). A row with another number of fields than the header is refused
    with its line, never read shifted or merged into the next."""
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    raise UserError(
                        f"{path}:{n} is not a JSON object", where="--probe", fix="one JSON object a line"
                    ) from None
                out.append(row)
        return out
    tsv = path.suffix == ".tsv"
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        try:
            header = next(reader, None)
            rows = []
            for fields in reader:
                if fields and len(fields) != len(header):
                    raise UserError(
                        f"{path}:{reader.line_num} has {len(fields)} fields, the header {len(header)}",
                        where="--probe",
                        fix="one row a line, "
                        + (
                            "tab-separated, no tab inside a field"
                            if tsv
                            else "fields with a comma or quote quoted as RFC 4180 says"
                        ),
                    )
                if fields:
                    rows.append(dict(zip(header, fields)))
        except csv.Error as e:
            raise UserError(
                f"{path}:{reader.line_num} is not valid {'TSV' if tsv else 'CSV'} ({e})", where="--probe"
            ) from None
    return rows


def load_probe(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    test_fraction: float = 0.2,
    max_rows: int | None = None,
    seed: int = 0,
) -> Probe:
    """Read a probe file and split it (see the module's docstring). `max_rows`: keep at most
    this many rows, drawn evenly over the groups with a seeded order (the cost of a probe is
    one forward pass per row and model)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"probe file {path} does not exist (from {Path.cwd()})",
            where="--probe",
            fix="give its path with --probe (or leave the probe out: --no-probe)",
        )
    if path.suffix not in FORMATS:
        raise UserError(
            f"{path} is not a {'/'.join(FORMATS)} file",
            where="--probe",
            fix="give a table with a text and a label column (e.g. data/brown/brown_genres.tsv)",
        )
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction {test_fraction} is not between 0 and 1", where="probe.test_fraction")
    try:
        rows = _rows(path)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", where="--probe", fix="convert it to UTF-8") from None
    wanted = [c for c in (text_column, label_column, group_column) if c]
    missing = [c for c in wanted if rows and c not in rows[0]]
    if not rows or missing:
        have = ", ".join(rows[0]) if rows else "no rows"
        raise UserError(
            f"{path} has no column {missing[0] if missing else text_column!r} (it has: {have})",
            where="--probe",
            fix="name its columns with --text-column, --label-column and --group-column",
        )
    rows = [r for r in rows if str(r.get(text_column) or "").strip() and str(r.get(label_column) or "").strip()]
    if max_rows is not None and len(rows) > max_rows:
        rows = _even_sample(rows, group_column, max_rows, seed)
    texts = [str(r[text_column]) for r in rows]
    labels = [str(r[label_column]) for r in rows]
    groups = [str(r[group_column]) for r in rows] if group_column else [str(i) for i in range(len(rows))]
    return Probe(path.stem, texts, labels, groups, _folds(labels, groups, test_fraction, seed, path))


def _even_sample(rows: list[dict], group_column: str | None, n: int, seed: int) -> list[dict]:
    """n rows: round-robin over the groups (each group's rows in file order), groups in a seeded order."""
    if not group_column:
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        return [rows[i] for i in keep]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(str(r[group_column]), []).append(r)
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    out, depth = [], 0
    while len(out) < n:
        for g in order:
            if depth < len(by_group[g]) and len(out) < n:
                out.append(by_group[g][depth])
        depth += 1
    return out


def _folds(
    labels: list[str], groups: list[str], test_fraction: float, seed: int, path: Path
) -> list[tuple[np.ndarray, np.ndarray]]:

    from sklearn.model_selection import StratifiedGroupKFold

    n = max(2, round(1 / test_fraction))
    if len(set(groups)) < n or len(set(labels)) < 2:
        raise UserError(
            f"{path} has {len(set(groups))} group(s) and {len(set(labels))} label(s): too few for a "
            f"{n}-fold split by group",
            where="--probe",
            fix="give more rows, or another --group-column",
        )
    with warnings.catch_warnings():  # a label with fewer groups than folds: it is stratified as well as it can be
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
        return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels, groups)]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states of `model` (a distil.model.student.MaskedLM), frozen, in fp32.
    The texts are batched in order of length (little padding), the rows returned in theirs."""

    ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    batches = (
        collate([ids[r] for r in order[i : i + batch_size]], tokenizer.pad_token_id, max_len)
        for i in range(0, len(order), batch_size)
    )
    out = embed(model, ((batch.to(device), mask.to(device)) for batch, mask in batches))
    return out[torch.argsort(torch.as_tensor(order))]  # back to the texts' order


CS = np.logspace(-4, 0, 5)  # the L2 strengths the probe's cross-validation chooses from (C = 1 / strength)


def score(embeddings: torch.Tensor, probe: Probe) -> dict:
    """Accuracy and macro-F1 over every row, each predicted by the logistic regression of the
    fold that holds it out; per fold, C is chosen by cross-validation over CS on the train side
    (3 folds by group, fit in parallel: in-process, the fits ran 4x slower on 2 cores). Measured
    on the Brown genres, a fixed C = 1 overfit 1,200 passages of 384 dimensions (0.28 accuracy
    for all-MiniLM-L6-v2, 0.37 with C chosen); over 3,000 passages C = 1e-3 does best."""

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = embeddings.double().numpy()
    y, groups = np.asarray(probe.labels), np.asarray(probe.groups)
    predicted = np.empty_like(y)
    for train, test in probe.folds:
        inner = list(GroupKFold(n_splits=min(3, len(set(groups[train])))).split(x[train], y[train], groups[train]))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=CS, cv=inner, max_iter=2000, n_jobs=len(inner)))
        # A fold may miss a rare label; a strength may not converge (others are chosen); scikit-learn
        # announces changes of its defaults (FutureWarning): none of it is the user's to act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, ConvergenceWarning, RuntimeWarning, FutureWarning))
            clf.fit(x[train], y[train])
        predicted[test] = clf.predict(x[test])
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
    }


def evaluate_probe(
    probe: Probe, teacher, student, tokenizer, max_len: int, batch_size: int = 32, teacher_scores: dict | None = None
) -> dict:
    """Both models' scores on the probe and the student's retention of each; `teacher_scores`:
    the teacher's, already measured (it is never trained: a run measures it once)."""
    if teacher_scores is None:
        teacher_scores = score(embed_texts(teacher, tokenizer, probe.texts, max_len, batch_size), probe)
    student_scores = score(embed_texts(student, tokenizer, probe.texts, max_len, batch_size), probe)
    out = {**probe.describe(), "teacher": teacher_scores, "student": student_scores}
    out["retention"] = {k: (student_scores[k] / v if v else float("nan")) for k, v in teacher_scores.items()}
    return out
