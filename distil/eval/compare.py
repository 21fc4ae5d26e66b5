"""`distil eval`: a student against its teacher on the same masked held-out text, and on a
downstream probe.

MLM loss (mean cross-entropy over masked positions) and accuracy (top-1 at those positions)
for each model that has an MLM head, the teacher/student agreement of sentence embeddings
(see distil.eval.measures), a downstream probe's accuracy and macro-F1 for each model (the run's
`eval.probe` section, or --probe; see distil.eval.probe), and the student's retention of each measure:
student ÷ teacher (teacher ÷ student for the loss), 1.0 = as good as its teacher. The text is the run's own held-out split when the
model folder carries the run's config (a pulled or exported model does), or any text given
with --data. Masks are drawn once, uniformly (no frequency smoothing), from a fixed seed, and
both models read exactly the same masked batches.
"""

from __future__ import annotations

# Imports inside functions: the probe (scikit-learn, the optional `eval` extra) only when it is used.
import math
import os
import time
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from distil.config.schema import DistilConfig, load_config, looks_local
from distil.config.sections import is_hub_name
from distil.data.batches import collate
from distil.data.masking import EVAL_STEP, Masker
from distil.data.prepared import held_out_of, sequences_of
from distil.errors import UserError
from distil.eval.measures import agreement, embed, mlm_counts
from distil.model.student import MaskedLM, has_mlm_head
from distil.model.teacher import load_teacher_config, load_tokenizer, max_positions
from distil.runs.export import RUN_CONFIG
from distil.secrets import check_uri
from distil.storage.paths import is_s3


def load_model(path: str) -> MaskedLM:
    """A model folder or hub name as MaskedLM: with its MLM head when it has one."""
    path = os.path.expanduser(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(
            f"cannot load a model from {path!r}: {str(e).splitlines()[0]}",
            fix="give a model folder (from `distil checkpoints pull`) or a hub name",
        ) from None
    try:
        model = (AutoModelForMaskedLM if has_mlm_head(config) else AutoModel).from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # truncated or damaged weights
        raise UserError(
            f"cannot load the weights in {path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
            fix="pull or export the model again",
        ) from None
    return MaskedLM(model.eval())


def _config_for(student: Path, teacher: str | None, data: list[str] | None, overrides: list[str]) -> DistilConfig:
    saved = student / RUN_CONFIG
    if saved.is_file():
        cfg = _from_where_the_run_started(load_config(saved, overrides), student)
        if teacher is None:
            _check_saved_teacher(cfg, saved)
    elif teacher is None or not data:
        raise UserError(
            f"{student} has no {RUN_CONFIG} (it was not pulled or exported by distil)", fix="pass --teacher and --data"
        )
    else:
        cfg = load_config(
            None,
            [
                f"teacher.name_or_path={teacher}",
                "student.layers=[0]",
                "train.max_steps=1",
                f"data.sources={data}",
                *overrides,
            ],
        )
        if not any(o.startswith("data.max_len=") for o in overrides):  # fit the teacher's positions
            limit = max_positions(load_teacher_config(cfg))
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_len": min(cfg.data.max_len, limit)})})
    updates = {}
    if teacher:
        updates["teacher"] = cfg.teacher.model_copy(update={"name_or_path": teacher})
    if data:
        updates["data"] = cfg.data.model_copy(update={"sources": list(data)})
    return cfg.model_copy(update=updates)


def _from_where_the_run_started(cfg: DistilConfig, student: Path) -> DistilConfig:
    """A run's own `model/` (STORAGE/RUN/model) evaluated from another folder: the relative
    paths of its config (teacher, data, storage) were relative to the folder the run was
    started from: the model's folder less `RUN/model` and a relative storage.uri. So are the
    probe's file and eval.sources. Paths that already exist from here, and absolute ones, are kept."""
    uri = cfg.storage.uri
    if is_s3(uri) or uri.startswith(("/", "~")):
        return cfg
    storage = student.resolve().parent.parent  # STORAGE of STORAGE/RUN/model
    parts = Path(uri).parts
    if not parts or storage.parts[-len(parts) :] != parts:
        return cfg
    base = Path(*storage.parts[: -len(parts)])

    def moved(path: str) -> str:
        p = Path(path)
        return str(base / p) if not p.is_absolute() and not p.expanduser().exists() and (base / p).exists() else path

    teacher = cfg.teacher.name_or_path
    data = {"sources": [s if is_s3(s) or is_hub_name(s) else moved(s) for s in cfg.data.sources]}
    if cfg.data.cache_dir:
        data["cache_dir"] = moved(cfg.data.cache_dir)
    probe = cfg.eval.probe.model_copy(update={"path": cfg.eval.probe.path and moved(cfg.eval.probe.path)})
    evaluation = cfg.eval.model_copy(
        update={"probe": probe, "sources": [s if is_s3(s) else moved(s) for s in cfg.eval.sources]}
    )
    return cfg.model_copy(
        update={
            "teacher": cfg.teacher.model_copy(
                update={"name_or_path": moved(teacher) if looks_local(teacher) else teacher}
            ),
            "data": cfg.data.model_copy(update=data),
            "eval": evaluation,
            "storage": cfg.storage.model_copy(update={"uri": moved(uri)}),
        }
    )


def _check_saved_teacher(cfg: DistilConfig, saved: Path) -> None:
    """The run's teacher is named as the run saw it: a relative folder is relative to where the
    run was started, which is seldom where `distil eval` runs."""

    name = cfg.teacher.name_or_path
    if looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(
            f"the run's teacher folder {name!r} (from {saved}) is not found from {Path.cwd()}",
            where="--teacher",
            fix="pass --teacher with the teacher's folder or hub id",
        )


def _sequences(cfg: DistilConfig, tokenizer, given_data: bool, max_sequences: int) -> list[list[int]]:

    # --data: that text; else the run's held-out split, which the student never trained on
    rows = sequences_of(cfg, tokenizer, max_sequences) if given_data else held_out_of(cfg, tokenizer, max_sequences)
    if not rows:
        raise UserError(
            "no evaluation sequences",
            where="--data" if given_data else f"data.sources of {RUN_CONFIG}",
            fix="give more text with --data" if given_data else "pass --data with held-out text",
        )
    return rows


def _mlm(model: MaskedLM, batches) -> dict | None:
    counts = mlm_counts(model, batches)
    if counts is None:
        return None
    loss, correct, n = counts
    return {"mlm_loss": loss / n, "mlm_accuracy": correct / n, "masked_tokens": n}


def evaluate_models(
    student_dir: str,
    teacher: str | None = None,
    data: list[str] | None = None,
    overrides=(),
    max_sequences: int = 512,
    batch_size: int = 32,
    probe: dict | None = None,
) -> dict:
    """`probe`: fields of the config's `probe` section to override (e.g. {"path": ...}); the
    run's own probe section otherwise, when it names a file."""

    check_flags(teacher, data, max_sequences, batch_size, probe or {})
    student_path = Path(student_dir).expanduser()
    cfg = _config_for(student_path, teacher, data, list(overrides))
    tokenizer = load_tokenizer(cfg)
    rows = _sequences(cfg, tokenizer, bool(data), max_sequences)
    masking = cfg.masking.model_copy(update={"smoothing": None, "prob": cfg.masking.prob or 0.15})
    masker = Masker(masking, tokenizer, cfg.run.seed)
    plain, batches = [], []
    for b, i in enumerate(range(0, len(rows), batch_size)):
        ids, attn = collate(rows[i : i + batch_size], tokenizer.pad_token_id, cfg.data.max_len)
        masked, labels = masker(ids, attn, EVAL_STEP, b)  # the masks training's held-out loss uses
        plain.append((ids, attn))
        batches.append((masked, attn, labels))
    student, teacher_model = load_model(str(student_path)), load_model(cfg.teacher.name_or_path)
    out = {
        "student": str(student_path),
        "teacher": cfg.teacher.name_or_path,
        "sequences": len(rows),
        "student_mlm": _mlm(student, batches),
        "teacher_mlm": _mlm(teacher_model, batches),
    }
    s, t = out["student_mlm"], out["teacher_mlm"]
    if s and t:
        out["loss_ratio"] = s["mlm_loss"] / t["mlm_loss"]  # > 1: the student is worse
        out["accuracy_ratio"] = s["mlm_accuracy"] / t["mlm_accuracy"] if t["mlm_accuracy"] else math.nan
    (t_emb, t_s), (s_emb, s_s) = _timed_embed(teacher_model, plain), _timed_embed(student, plain)
    if len(rows) >= 3:  # (each model's own pairwise similarities: any widths)
        out["agreement"] = agreement(t_emb, s_emb)
    t_params, s_params = (sum(p.numel() for p in m.model.parameters()) for m in (teacher_model, student))
    out["size"] = {"teacher_parameters": t_params, "student_parameters": s_params, "ratio": s_params / t_params}
    out["speed"] = {
        "teacher_sentences_per_s": len(rows) / t_s,
        "student_sentences_per_s": len(rows) / s_s,
        "speedup": t_s / s_s,
        "threads": torch.get_num_threads(),
    }
    section = _probe_section(cfg, probe or {})
    if section.path:
        out["probe"] = _probe(section, teacher_model, student, tokenizer, batch_size, cfg.run.seed)
    out["retention"] = _retention(out)
    return out


def check_flags(teacher: str | None, data: list[str] | None, max_sequences: int, batch_size: int, probe: dict) -> None:
    """distil eval's flags, before anything is loaded: counts of at least 1, and no URI that
    carries a credential (distil/secrets.py; the message never repeats it)."""
    for flag, value in (("--max-sequences", max_sequences), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(
                f"{flag} {value}: must be 1 or more",
                where=flag,
                fix=f"give {flag} 1 or more (see `distil eval --help`)",
            )
    check_uri(teacher, "--teacher")
    for source in data or []:
        check_uri(source, "--data")
    check_uri(probe.get("path"), "--probe")


def _timed_embed(model: MaskedLM, batches) -> tuple[torch.Tensor, float]:
    """Sentence embeddings and the seconds they took (a forward pass of every batch; the
    models were warmed up by the MLM passes)."""

    started = time.perf_counter()
    emb = embed(model, batches)
    return emb, time.perf_counter() - started


def _probe_section(cfg: DistilConfig, given: dict):
    """The run's probe section with the flags given (validated like the config)."""

    try:
        return type(cfg.eval.probe).model_validate(
            {**cfg.eval.probe.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        )
    except ValidationError as e:
        first = e.errors()[0]
        flag = {"max_rows": "--probe-rows"}.get(str(first["loc"][0]), f"eval.probe.{first['loc'][0]}")
        raise UserError(f"{flag}: {first['msg']}", where=flag, fix="see `distil eval --help`") from None


def _probe(section, teacher: MaskedLM, student: MaskedLM, tokenizer, batch_size: int, seed: int) -> dict:
    from distil.eval.probe import evaluate_probe, load_probe

    probe = load_probe(
        section.path,
        section.text_column,
        section.label_column,
        section.group_column,
        section.test_fraction,
        section.max_rows,
        seed,
    )
    max_len = min(section.max_len, max_positions(teacher.model.config), max_positions(student.model.config))
    return evaluate_probe(probe, teacher, student, tokenizer, max_len, batch_size)


def _retention(r: dict) -> dict:
    """The student's share of its teacher's quality, per measure (1.0: as good as the teacher)."""
    out = {}
    if "accuracy_ratio" in r:
        out["mlm_accuracy"], out["mlm_loss"] = r["accuracy_ratio"], 1 / r["loss_ratio"]
    if "probe" in r:
        out.update({f"probe_{k}": v for k, v in r["probe"]["retention"].items()})
    return out


def format_report(r: dict) -> str:
    lines = [f"{r['sequences']} sequences; student {r['student']} vs teacher {r['teacher']}"]
    for who in ("teacher", "student"):
        m = r[f"{who}_mlm"]
        lines.append(
            f"  {who:8s} MLM loss {m['mlm_loss']:.4f}  accuracy {m['mlm_accuracy']:.4f}  ({m['masked_tokens']} masked tokens)"
            if m
            else f"  {who:8s} has no MLM head"
        )
    if "loss_ratio" in r:
        lines.append(f"  student/teacher: loss x{r['loss_ratio']:.3f}, accuracy x{r['accuracy_ratio']:.3f}")
    if "agreement" in r:
        lines.append(f"  agreement (Spearman of pairwise sentence cosines): {r['agreement']:.4f}")
    if "size" in r:
        z, v = r["size"], r["speed"]
        lines.append(
            f"  size: student {z['student_parameters'] / 1e6:.1f}M parameters, teacher {z['teacher_parameters'] / 1e6:.1f}M "
            f"(x{z['ratio']:.2f}); speed here ({v['threads']} threads): student {v['student_sentences_per_s']:.1f} "
            f"sentences/s, teacher {v['teacher_sentences_per_s']:.1f} (x{v['speedup']:.2f})"
        )
    if "probe" in r:
        p = r["probe"]
        lines.append(
            f"  probe {p['name']}: {p['classes']} classes, {p['rows']} rows of {p['groups']} groups, each predicted "
            f"by one of {p['folds']} classifiers that held its group out"
        )
    rows = [
        ("MLM accuracy", "mlm", "mlm_accuracy", "mlm_accuracy"),
        ("MLM loss (lower is better)", "mlm", "mlm_loss", "mlm_loss"),
    ]
    table = [
        (name, r[f"teacher_{src}"][key], r[f"student_{src}"][key], r["retention"][ret])
        for name, src, key, ret in rows
        if ret in r["retention"]
    ]
    if "probe" in r:
        p = r["probe"]
        table += [
            (f"{p['name']} {label}", p["teacher"][k], p["student"][k], p["retention"][k])
            for label, k in (("accuracy", "accuracy"), ("macro-F1", "macro_f1"))
        ]
    if table:
        lines += ["", f"  {'measure':34s} {'teacher':>8s} {'student':>8s} {'retention':>9s}"]
        lines += [f"  {name:34s} {t:8.4f} {s:8.4f} {ret:9.1%}" for name, t, s, ret in table]
    return "\n".join(lines)
