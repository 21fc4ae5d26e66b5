"""DistilBERT's ablation at small scale (issue 17): which parts of the triple loss, and the
student's initialisation from teacher layers, matter for the student's quality?

No MLM teacher can be downloaded here, so the bench makes one first: all-MiniLM-L6-v2's
pretrained encoder (models/, `make setup` links it) with a masked-LM head, trained with the
MLM objective on the train side of the committed Brown sample (a few CPU minutes; plain
PyTorch, 15% masking 80/10/10). Then each variant distils a 3-layer student from it with
`distil train` -- the code path users run -- on the same text, for the same steps (--batch lines
a step; the `distilbert` recipe reads the 30k-way heads of both models at every token):

    full        5*KL(T=2) + 2*MLM + 1*cos, student = teacher layers [0, 2, 5]
    no-kl       2*MLM + 1*cos
    no-cos      5*KL + 2*MLM
    mlm-only    2*MLM
    random-init the full loss, student.init = random

and `distil eval` measures it against the teacher on the test side (a tenth of the sample's
lines, never trained on by teacher or student): held-out MLM accuracy (same masks for both
models) and the Brown genre probe (data/brown/brown_genres.tsv, 1,000 of its rows, two of each
text; logistic regression on frozen mean-pooled embeddings, cross-validated by text). Each variant runs
with every seed in --seeds; the table gives the mean and half the spread (max - min) over seeds.

    .venv/bin/python bench/quality.py --steps 120 --teacher-steps 300 --seeds 0 1   # ~30 min on 2 cores
    .venv/bin/python bench/quality.py --steps 60 --seeds 0 --teacher-steps 40   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import PY, ROOT, _env, machine  # noqa: E402

SOURCE = ROOT / "data" / "brown" / "brown_sample.txt"
PROBE = ROOT / "data" / "brown" / "brown_genres.tsv"
BASE_TEACHER = ROOT / "models" / "all-MiniLM-L6-v2"
LAYERS = [0, 2, 5]
VARIANTS = {  # name: config overrides on top of the base below
    "full": {},
    "no-kl": {"loss.alpha_kl": 0.0},
    "no-cos": {"loss.alpha_cos": 0.0},
    "mlm-only": {"loss.alpha_kl": 0.0, "loss.alpha_cos": 0.0},
    "random-init": {"student.init": "random"},
}


def split_text(work: Path) -> tuple[Path, Path]:
    """Every 10th non-empty line of the sample to the test side, the rest to the train side."""
    lines = [x for x in SOURCE.read_text(encoding="utf-8").splitlines() if x.strip()]
    train, test = work / "train.txt", work / "test.txt"
    train.write_text("\n".join(x for i, x in enumerate(lines) if i % 10) + "\n", encoding="utf-8")
    test.write_text("\n".join(x for i, x in enumerate(lines) if i % 10 == 0) + "\n", encoding="utf-8")
    return train, test


def make_teacher(work: Path, train: Path, steps: int, seed: int = 0) -> tuple[Path, dict]:
    """BertForMaskedLM = the pretrained encoder + a new MLM head (its decoder tied to the word
    embeddings), trained `steps` steps of 64 lines on `train`; saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    out = work / f"teacher-{steps}"
    if (out / "DONE").is_file():
        return out, json.loads((out / "DONE").read_text())
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(BASE_TEACHER)
    model = BertForMaskedLM.from_pretrained(BASE_TEACHER)  # the encoder's weights; the head starts at random
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=seed)
    lines = [x for x in train.read_text(encoding="utf-8").splitlines() if x.strip()]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.05 * steps)) * max(0.0, 1 - s / steps)
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(len(lines), (64,), generator=g).tolist()
        enc = tok([lines[i] for i in idx], truncation=True, max_length=64)
        batch = collate([{"input_ids": x} for x in enc["input_ids"]])
        ids, labels = batch["input_ids"], batch["labels"]
        hidden = model.bert(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).last_hidden_state
        masked = labels != -100  # the head's 30k-way decoder only where a loss is read (~6x less work)
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[masked]), labels[masked])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"teacher step {step + 1}/{steps} mlm_loss={statistics.mean(losses[-50:]):.3f}", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"steps": steps, "seconds": time.perf_counter() - started, "final_mlm_loss": statistics.mean(losses[-50:])}
    (out / "DONE").write_text(json.dumps(info))
    return out, info


def config(work: Path, teacher: Path, train: Path, steps: int, batch: int) -> Path:
    cfg = {
        "run": {"name": "quality"},
        "teacher": {"name_or_path": str(teacher)},
        "student": {"layers": LAYERS},
        "data": {
            "sources": [str(train)],
            "packing": "lines",
            "max_len": 64,
            "min_len": 8,
            "eval_fraction": 0.02,
            "eval_max_sequences": 64,
        },
        "masking": {"prob": 0.15},
        "loss": {"recipe": "distilbert", "temperature": 2.0, "alpha_kl": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
        "optim": {"lr": 5e-4, "warmup_ratio": 0.05, "grad_clip": 5.0},
        "train": {
            "max_steps": steps,
            "micro_batch_size": batch,
            "global_batch_size": batch,
            "log_every": 50,
            "progress_bar": False,
        },
        "checkpoint": {"every_steps": steps, "keep_last": 1},
        "storage": {"uri": str(work / "runs")},
    }
    path = work / "quality.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_variant(work: Path, cfg: Path, test: Path, name: str, seed: int) -> dict:
    run = f"{name}-s{seed}"
    sets = {**VARIANTS[name], "run.name": run, "run.seed": seed}
    args = [
        PY,
        "-m",
        "distil.cli",
        "train",
        "--config",
        str(cfg),
        *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
    ]
    started = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=_env())
    if r.returncode:
        raise SystemExit(f"{run}: distil train failed\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    train_s = time.perf_counter() - started
    ev = subprocess.run(
        [
            PY,
            "-m",
            "distil.cli",
            "eval",
            str(work / "runs" / run / "model"),
            "--data",
            str(test),
            "--json",
            "--probe",
            str(PROBE),
            "--text-column",
            "passage",
            "--label-column",
            "genre",
            "--group-column",
            "text_id",
            "--probe-rows",
            "1000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    if ev.returncode:
        raise SystemExit(f"{run}: distil eval failed\n{ev.stderr[-3000:]}")
    rep = json.loads(ev.stdout)
    row = {
        "variant": name,
        "seed": seed,
        "train_s": train_s,
        "mlm_accuracy": rep["student_mlm"]["mlm_accuracy"],
        "teacher_mlm_accuracy": rep["teacher_mlm"]["mlm_accuracy"],
        "probe_accuracy": rep["probe"]["student"]["accuracy"],
        "teacher_probe_accuracy": rep["probe"]["teacher"]["accuracy"],
        "agreement": rep.get("agreement"),
    }
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    """Mean ± half the spread over seeds. A seed draws the evaluation's masks and the probe's
    split too, so the teacher's figures are per seed as well (each seed weighs the same)."""

    def cell(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"
            if len(values) > 1
            else f"{values[0]:.3f}"
        )

    out = ["| variant | held-out MLM accuracy | genre probe accuracy | agreement |", "|---|---:|---:|---:|"]
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        if mine:
            out.append(
                f"| {name} | "
                + " | ".join(cell([r[k] for r in mine]) for k in ("mlm_accuracy", "probe_accuracy", "agreement"))
                + " |"
            )
    per_seed = {r["seed"]: r for r in rows}.values()
    out.append(
        f"| teacher | {cell([r['teacher_mlm_accuracy'] for r in per_seed])} | "
        f"{cell([r['teacher_probe_accuracy'] for r in per_seed])} | 1 |"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="distillation steps of each student (--batch lines a step)")
    ap.add_argument(
        "--batch", type=int, default=32, help="lines a distillation step (KL reads the 30k-way heads at every token)"
    )
    ap.add_argument("--teacher-steps", type=int, default=300, help="MLM steps that make the teacher (64 lines a step)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="a run of every variant for each seed")
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which variants to run"
    )
    ap.add_argument("--work", default="/tmp/distil-quality", help="the teacher, the text split and the runs")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # runs of an earlier call would be resumed, not run
    train, test = split_text(work)
    teacher, teacher_info = make_teacher(work, train, a.teacher_steps)
    cfg = config(work, teacher, train, a.steps, a.batch)
    rows = [
        run_variant(work, cfg, test, name, seed) for seed in a.seeds for name in a.variants
    ]  # every variant of a seed first
    out = {
        "machine": machine(),
        "command": "bench/quality.py " + " ".join(argv or sys.argv[1:]),
        "teacher": teacher_info,
        "steps": a.steps,
        "batch": a.batch,
        "rows": rows,
        "table": table(rows),
    }
    print(json.dumps(out, indent=1))
    print(out["table"])
    return out


if __name__ == "__main__":
    main()
