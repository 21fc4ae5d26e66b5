"""The README.md of an exported model (a Hugging Face model card): what was distilled from
what, how, on which data, for how long, and the held-out figures at the start and at the
checkpoint. Written from the checkpoint alone (its config.yaml, trainer_state.json, COMPLETE
and metrics.jsonl), so `distil export` and `distil checkpoints pull` give the same card.
`from_pretrained` ignores the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from distil.config.schema import looks_local
from distil.runs import layout as ckpt
from distil.runs.metrics_log import METRICS, read_rows, resize_text

# The loss terms as a reader knows them, by their weight in the config.
TERMS = {
    "alpha_kl": "KL(teacher || student) at temperature T",
    "alpha_mlm": "masked-LM cross-entropy",
    "alpha_cos": "cosine of last hidden states",
    "alpha_mse": "MSE of logits",
    "alpha_mse_hidden": "MSE of last hidden states",
    "alpha_cos_intermediate": "cosine of intermediate hidden states",
}


def _held_out(ckpt_dir: Path, step: int) -> list[str]:
    """Rows of the held-out table: each eval metric at step 0 and at the checkpoint's step."""
    if not (ckpt_dir / METRICS).is_file():
        return []
    shown = ("eval/", "eval_", "probe/")  # held-out, eval.sources, the probe
    evals = {r["step"]: r for r in read_rows(ckpt_dir / METRICS) if any(k.startswith(shown) for k in r)}
    start, end = evals.get(0, {}), evals.get(step, {})
    keys = sorted((k for k in {*start, *end} if k.startswith(shown)), key=lambda k: (k.startswith("probe/"), k))

    def cell(row: dict, k: str) -> str:
        if not isinstance(row.get(k), (int, float)):
            return "–"
        return f"{row[k]:,}" if isinstance(row[k], int) else f"{row[k]:.4f}"

    if not keys:
        return []
    return [
        "",
        f"## Held-out figures (step 0 → step {step})",
        "",
        "| metric | step 0 (the initialised student) | step " + str(step) + " |",
        "|---|---|---|",
        *(f"| {k.removeprefix('eval/')} | {cell(start, k)} | {cell(end, k)} |" for k in keys),
        "",
        "`loss` and its terms are the training objective on the held-out split (lower is better); "
        "`agreement` is the correlation of the teacher's and the student's sentence similarities "
        "(higher is better); `eval_<name>/agreement` is the same on other text the run names, never trained on."
        + (
            " `probe/…`: a logistic regression on the frozen, mean-pooled embeddings of each model "
            "(a downstream probe, split by group); `retention` is the student's score ÷ the teacher's."
            if any(k.startswith("probe/") for k in keys)
            else ""
        ),
    ]


def _planned(state: dict, train: dict) -> str:
    """'N of M steps': M is max_steps, or what the run's time budget planned."""
    planned, max_steps = state.get("planned_steps"), train.get("max_steps")
    if planned is None or planned == max_steps:
        return f"{state['step']:,} of {max_steps:,} steps" if isinstance(max_steps, int) else f"{state['step']:,} steps"
    return (
        f"{state['step']:,} of {planned:,} steps (what a {train.get('time_budget_minutes', 0):g}-minute time budget "
        f"planned; max_steps {max_steps:,})"
    )


def model_card(ckpt_dir: Path, has_mlm_head: bool) -> str:
    ckpt_dir = Path(ckpt_dir)
    cfg = yaml.safe_load((ckpt_dir / "config.yaml").read_text()) if (ckpt_dir / "config.yaml").is_file() else {}
    state = ckpt.read_trainer_state(ckpt_dir)
    complete = ckpt.read_complete(ckpt_dir)
    teacher, student, data = cfg.get("teacher", {}), cfg.get("student", {}), cfg.get("data", {})
    loss, train = cfg.get("loss", {}), cfg.get("train", {})
    name = teacher.get("name_or_path", "?")
    hub_teacher = not looks_local(name)
    front = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'fill-mask' if has_mlm_head else 'feature-extraction'}",
        "tags: [distillation, distil-run]",
        *([f"base_model: {name}"] if hub_teacher else []),
        "---",
    ]
    terms = [f"{TERMS[k]} × {loss[k]:g}" for k in TERMS if loss.get(k)]
    layers = student.get("layers", [])
    rows = [
        ("teacher", f"`{name}`" + (f" (revision `{teacher['revision']}`)" if teacher.get("revision") else "")),
        (
            "student",
            f"{len(layers)} layers, initialised from the teacher's layers {layers} "
            f"({student.get('architecture', 'same')} architecture)",
        ),
        ("objective", f"recipe `{loss.get('recipe', '?')}`, T = {loss.get('temperature', '?')}: " + "; ".join(terms)),
        (
            "data",
            ", ".join(f"`{s}`" for s in data.get("sources", [])) + f"; sequences of at most {data.get('max_len', '?')} "
            f"tokens, packing `{data.get('packing', '?')}`",
        ),
        (
            "trained",
            f"{_planned(state, train)}, {state['tokens']:,} tokens, "
            f"{train.get('global_batch_size', '?')} sequences a step on {state.get('world_size', '?')} worker(s)"
            + (f" (resized: {resize_text(state['resizes'])})" if state.get("resizes") else ""),
        ),
        (
            "checkpoint",
            f"`{ckpt_dir.name}`, saved {complete.get('saved_at', '?')}, training loss {complete.get('loss', float('nan')):.4f}",
        ),
    ]
    body = [
        f"# {cfg.get('run', {}).get('name') or ckpt_dir.parent.name}",
        "",
        "A student model distilled from its teacher with distil-run (triple loss, student initialised from "
        "teacher layers, dynamic masking). "
        "`distil_config.yaml` beside this file is the run's whole resolved config.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        *_held_out(ckpt_dir, state["step"]),
    ]
    return "\n".join(front + body) + "\n"
