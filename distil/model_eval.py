"""`distil eval`: a student against its teacher on the same masked held-out text.

MLM loss (mean cross-entropy over masked positions) and accuracy (top-1 at those positions)
for each model that has an MLM head, their ratios, and the teacher/student agreement of
sentence embeddings (see distil.evaluate). The text is the run's own held-out split when the
model folder carries the run's config (a pulled or exported model does), or any text given
with --data. Masks are drawn once, uniformly (no frequency smoothing), from a fixed seed, and
both models read exactly the same masked batches.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from distil.config import DistilConfig, load_config
from distil.data import collate
from distil.errors import UserError
from distil.paths import is_s3
from distil.evaluate import agreement, embed
from distil.export import RUN_CONFIG
from distil.masking import IGNORE, Masker
from distil.model import MaskedLM, has_mlm_head


def load_model(path: str) -> MaskedLM:
    """A model folder or hub name as MaskedLM: with its MLM head when it has one."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    path = os.path.expanduser(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a model from {path!r}: {str(e).splitlines()[0]}",
                        fix="give a model folder (from `distil checkpoints pull`) or a hub name") from None
    try:
        model = (AutoModelForMaskedLM if has_mlm_head(config) else AutoModel).from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # truncated or damaged weights
        raise UserError(f"cannot load the weights in {path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        fix="pull or export the model again") from None
    return MaskedLM(model.eval())


def _config_for(student: Path, teacher: str | None, data: list[str] | None, overrides: list[str]) -> DistilConfig:
    saved = student / RUN_CONFIG
    if saved.is_file():
        cfg = _from_where_the_run_started(load_config(saved, overrides), student)
        if teacher is None:
            _check_saved_teacher(cfg, saved)
    elif teacher is None or not data:
        raise UserError(f"{student} has no {RUN_CONFIG} (it was not pulled or exported by distil)",
                        fix="pass --teacher and --data")
    else:
        from distil.model import load_teacher_config, max_positions

        cfg = load_config(None, [f"teacher.name_or_path={teacher}", "student.layers=[0]", "train.max_steps=1",
                                 f"data.sources={data}", *overrides])
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
    started from: the model's folder less `RUN/model` and a relative storage.uri. Paths that already exist from here, and absolute ones, are kept."""
    uri = cfg.storage.uri
    if is_s3(uri) or uri.startswith(("/", "~")):
        return cfg
    storage = student.resolve().parent.parent  # STORAGE of STORAGE/RUN/model
    parts = Path(uri).parts
    if not parts or storage.parts[-len(parts):] != parts:
        return cfg
    base = Path(*storage.parts[:-len(parts)])

    def moved(path: str) -> str:
        p = Path(path)
        return str(base / p) if not p.is_absolute() and not p.expanduser().exists() and (base / p).exists() else path

    from distil.config import looks_local
    from distil.corpus import is_hub_name

    teacher = cfg.teacher.name_or_path
    data = {"sources": [s if is_s3(s) or is_hub_name(s) else moved(s) for s in cfg.data.sources]}
    if cfg.data.cache_dir:
        data["cache_dir"] = moved(cfg.data.cache_dir)
    return cfg.model_copy(update={
        "teacher": cfg.teacher.model_copy(update={"name_or_path": moved(teacher) if looks_local(teacher) else teacher}),
        "data": cfg.data.model_copy(update=data),
        "storage": cfg.storage.model_copy(update={"uri": moved(uri)})})


def _check_saved_teacher(cfg: DistilConfig, saved: Path) -> None:
    """The run's teacher is named as the run saw it: a relative folder is relative to where the
    run was started, which is seldom where `distil eval` runs."""
    from distil.config import looks_local

    name = cfg.teacher.name_or_path
    if looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"the run's teacher folder {name!r} (from {saved}) is not found from {Path.cwd()}",
                        where="--teacher", fix="pass --teacher with the teacher's folder or hub id")


def _sequences(cfg: DistilConfig, tokenizer, given_data: bool, max_sequences: int) -> list[list[int]]:
    from distil.prepared import held_out_of, sequences_of

    # --data: that text; else the run's held-out split, which the student never trained on
    rows = sequences_of(cfg, tokenizer, max_sequences) if given_data else held_out_of(cfg, tokenizer, max_sequences)
    if not rows:
        raise UserError("no evaluation sequences", where="--data" if given_data else f"data.sources of {RUN_CONFIG}",
                        fix="give more text with --data" if given_data else "pass --data with held-out text")
    return rows


@torch.no_grad()
def _mlm(model: MaskedLM, batches) -> dict | None:
    if not model.has_head:
        return None
    loss, correct, n = 0.0, 0, 0
    for masked, attn, labels in batches:
        flat = labels.reshape(-1)
        positions = torch.nonzero(flat != IGNORE).squeeze(1)
        _, logits = model(masked, attn, positions)
        target = flat[positions]
        loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        n += len(positions)
    return {"mlm_loss": loss / n, "mlm_accuracy": correct / n, "masked_tokens": n}


def evaluate_models(student_dir: str, teacher: str | None = None, data: list[str] | None = None, overrides=(),
                    max_sequences: int = 512, batch_size: int = 32) -> dict:
    from distil.masking import EVAL_STEP
    from distil.run_setup import load_tokenizer

    student_path = Path(student_dir).expanduser()
    cfg = _config_for(student_path, teacher, data, list(overrides))
    tokenizer = load_tokenizer(cfg)
    rows = _sequences(cfg, tokenizer, bool(data), max_sequences)
    masking = cfg.masking.model_copy(update={"smoothing": None, "prob": cfg.masking.prob or 0.15})
    masker = Masker(masking, tokenizer, cfg.run.seed)
    plain, batches = [], []
    for b, i in enumerate(range(0, len(rows), batch_size)):
        ids, attn = collate(rows[i:i + batch_size], tokenizer.pad_token_id, cfg.data.max_len)
        masked, labels = masker(ids, attn, EVAL_STEP, b)  # the masks training's held-out loss uses
        plain.append((ids, attn))
        batches.append((masked, attn, labels))
    student, teacher_model = load_model(str(student_path)), load_model(cfg.teacher.name_or_path)
    out = {"student": str(student_path), "teacher": cfg.teacher.name_or_path, "sequences": len(rows),
           "student_mlm": _mlm(student, batches), "teacher_mlm": _mlm(teacher_model, batches)}
    s, t = out["student_mlm"], out["teacher_mlm"]
    if s and t:
        out["loss_ratio"] = s["mlm_loss"] / t["mlm_loss"]  # > 1: the student is worse
        out["accuracy_ratio"] = s["mlm_accuracy"] / t["mlm_accuracy"] if t["mlm_accuracy"] else math.nan
    same_width = teacher_model.model.config.hidden_size == student.model.config.hidden_size  # DistilBERT maps dim
    if same_width and len(rows) >= 3:
        out["agreement"] = agreement(embed(teacher_model, plain), embed(student, plain))
    return out


def format_report(r: dict) -> str:
    lines = [f"{r['sequences']} sequences; student {r['student']} vs teacher {r['teacher']}"]
    for who in ("teacher", "student"):
        m = r[f"{who}_mlm"]
        lines.append(f"  {who:8s} MLM loss {m['mlm_loss']:.4f}  accuracy {m['mlm_accuracy']:.4f}  ({m['masked_tokens']} masked tokens)"
                     if m else f"  {who:8s} has no MLM head")
    if "loss_ratio" in r:
        lines.append(f"  student/teacher: loss x{r['loss_ratio']:.3f}, accuracy x{r['accuracy_ratio']:.3f}")
    if "agreement" in r:
        lines.append(f"  agreement (Spearman of pairwise sentence cosines): {r['agreement']:.4f}")
    return "\n".join(lines)
