"""End-to-end local runs through the real entry point (jobs/distill.py): DeepSpeed ZeRO-2 at
world size 1 on CPU, a tiny random BertForMaskedLM teacher, real text."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, base_config, write_config

pytestmark = pytest.mark.slow


def cli(config: Path, *overrides: str, wait=True):
    args = [sys.executable, "-m", "distil.cli", "train", "--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoints_metrics_and_a_loadable_model(tmp_path, teacher_dir):
    from transformers import AutoModelForMaskedLM, pipeline

    from distil.config.schema import load_config
    from distil.runs.export import fp32_state_dict
    from distil.runs.layout import complete_tags, read_trainer_state

    cfg_path = write_config(tmp_path / "c.yaml", base_config(teacher_dir, tmp_path))
    out = cli(cfg_path).stdout
    run = tmp_path / "runs" / "t"
    root = run  # checkpoints are RUN/step_N, as in a Ray run
    assert complete_tags(root) == ["step_00000003", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006"
    last = root / "step_00000006"
    for name in (
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rank_00000.pt",
        "COMPLETE",
        "hf/config.json",
        "hf/tokenizer.json",
    ):
        assert (last / name).is_file(), name
    state = read_trainer_state(last)
    assert state["step"] == 6 and state["world_size"] == 1 and state["sampler"]["consumed"] > 0
    assert load_config(last / "config.yaml") == load_config(cfg_path)

    rows = metrics(run)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"train/kl", "train/mlm", "train/cos", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(r)
        assert abs(r["train/loss"] - (5 * r["train/kl"] + 2 * r["train/mlm"] + r["train/cos"])) < 1e-4
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert train_rows[-1]["tokens"] == state["tokens"] > 0
    assert train_rows[0]["lr"] > 0 and train_rows[-1]["lr"] < train_rows[1]["lr"]  # linear decay
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6] and "agreement" in out

    model_dir = run / "model"
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2
    merged = fp32_state_dict(last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    fill = pipeline("fill-mask", model=str(model_dir))
    assert len(fill(f"the {fill.tokenizer.mask_token} of the jury")) == 5


def _kill_after(proc, run_dir: Path, step: int, sig) -> str:
    """Send `sig` once a checkpoint at >= step is complete; returns the latest tag at that moment."""
    latest = run_dir / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() >= f"step_{step:08d}":
            tag = latest.read_text()
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return tag
        time.sleep(0.01)
    raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-2000:]}")


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = base_config(
        teacher_dir,
        tmp,
        train={"max_steps": 24, "global_batch_size": 16, "log_every": 4},
        checkpoint={"every_steps": 4, "keep_last": 3},
    )
    path = write_config(tmp / "c.yaml", cfg)
    cli(path)
    return cfg, _weights(tmp / "runs" / "t")


def _interrupted_then_resumed(tmp_path, cfg, sig, expect_rc):
    cfg = {**cfg, "storage": {"uri": str(tmp_path / "runs")}}
    path = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "runs" / "t"
    proc = cli(path, wait=False)
    tag = _kill_after(proc, run, 4, sig)
    assert proc.returncode == expect_rc, proc.stdout.read()[-3000:]
    stopped_at = (run / "latest").read_text()
    assert stopped_at < "step_00000024", "the run must be interrupted before it ends"
    last_logged = max(r["step"] for r in metrics(run) if "train/loss" in r)
    beat = json.loads((run / "heartbeat.json").read_text())  # the killed run's last sign of life
    resumed = cli(path).stdout
    assert f"resumed from {stopped_at}" in resumed
    # The run's heartbeat (a beat at most every 2 s, then the checkpoint, whichever is later) says
    # how long the run trained nothing and which steps are trained again.
    m = re.search(r"the run's last sign of life: step (\d+), (\d+) s ago \((.*?)\)", resumed)
    assert m, resumed[-3000:]
    stopped = int(stopped_at[5:])
    last = max(stopped, beat["step"])
    assert int(m.group(1)) == last, (beat, stopped_at)
    assert m.group(3) == ("the checkpoint's" if last == stopped else f"steps {stopped + 1}-{last} are trained again")
    if sig == signal.SIGTERM:  # its checkpoint is of the step in flight: no step after it to train again
        assert last == stopped, (beat, stopped_at)
    # Held out at step 0 and at the end, as an uninterrupted run: a resumed run does not evaluate
    # again before its first step (it only delayed that step), and its summary starts from step 0.
    assert [r["step"] for r in metrics(run) if "eval/loss" in r] == [0, 24]
    step0 = next(r for r in metrics(run) if "eval/loss" in r)
    assert f"start {step0['eval/loss']:.4f} ->" in resumed
    return int(tag[5:]), int(stopped_at[5:]), last_logged, _weights(run)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, uninterrupted):
    cfg, reference = uninterrupted
    *_, weights = _interrupted_then_resumed(tmp_path, cfg, signal.SIGKILL, -signal.SIGKILL)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_sigterm_checkpoints_within_one_step_and_resumes_exactly(tmp_path, uninterrupted):
    cfg, reference = uninterrupted
    seen_step, stop_step, last_logged, weights = _interrupted_then_resumed(tmp_path, cfg, signal.SIGTERM, 128 + 15)
    # The worker finished the step in flight and checkpointed it: every completed step is saved
    # (the step it logged last), not only the last periodic checkpoint.
    assert stop_step == last_logged >= seen_step
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_masked_recipe_whole_word_distilbert_architecture(tmp_path, teacher_dir):
    cfg = base_config(
        teacher_dir,
        tmp_path,
        student={"layers": [1, 3], "architecture": "distilbert"},
        loss={"recipe": "masked", "alpha_mse": 1.0, "alpha_cos_intermediate": 1.0},
        masking={"whole_word": True, "smoothing": 0.7},
        data={"packing": "lines", "min_len": 6},
    )
    cli(write_config(tmp_path / "c.yaml", cfg))
    rows = [r for r in metrics(tmp_path / "runs" / "t") if "train/loss" in r]
    assert {"train/kl", "train/mlm", "train/cos", "train/mse", "train/cos_intermediate"} <= set(rows[-1])
    from transformers import AutoModelForMaskedLM

    assert (
        type(AutoModelForMaskedLM.from_pretrained(tmp_path / "runs" / "t" / "model")).__name__
        == "DistilBertForMaskedLM"
    )


def test_compiled_run_matches_eager(tmp_path, wordpiece, monkeypatch):
    """train.compile=true: Inductor-compiled transformer layers give the eager run's losses and
    final weights to float rounding, under the same parameter names. (A dropout-free teacher, so
    the student has none either: Inductor draws its own dropout masks.)"""
    from transformers import BertForMaskedLM

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    BertForMaskedLM(
        tiny_bert_config(len(wordpiece), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ).save_pretrained(teacher)
    wordpiece.save_pretrained(teacher)
    runs = {}
    for compiled in (False, True):
        d = tmp_path / ("compiled" if compiled else "eager")
        d.mkdir()
        cfg = base_config(
            teacher, d, train={"max_steps": 3, "log_every": 1, "compile": compiled}, checkpoint={"every_steps": 3}
        )
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(d / "inductor"))  # where Inductor writes its kernels
        cli(write_config(d / "c.yaml", cfg))
        kernels = [f for f in (d / "inductor").rglob("*") if f.is_file()]
        assert bool(kernels) == compiled  # Inductor generated code in the compiled run only
        runs[compiled] = (
            [r["train/loss"] for r in metrics(d / "runs" / "t") if "train/loss" in r],
            _weights(d / "runs" / "t"),
        )
    (eager_losses, eager_w), (comp_losses, comp_w) = runs[False], runs[True]
    assert len(eager_losses) == 3 and comp_losses == pytest.approx(eager_losses, rel=1e-5)
    assert comp_w.keys() == eager_w.keys()
    assert all(torch.allclose(comp_w[k], eager_w[k], rtol=1e-4, atol=1e-5) for k in eager_w)


def test_a_narrower_student_trains_and_exports_without_its_projection(tmp_path, teacher_dir):
    """16 wide with 2 heads of 8, from a 32-wide teacher: KL and the cosine of hidden states
    through the learned projection lower after training, with MiniLMv2's relations in the
    objective (a random teacher's attention is near uniform: that term is ~1e-4 here); the
    projection is in the checkpoints and not in the exported model. (That such a student comes to agree more
    with a real teacher: tests/integration/test_demo.py.)"""
    from safetensors import safe_open

    cfg = base_config(
        teacher_dir,
        tmp_path,
        student={"layers": [1, 3], "hidden_size": 16, "num_attention_heads": 2},
        loss={"alpha_kl": 1.0, "alpha_mlm": 0.0, "alpha_cos": 1.0, "alpha_relation": 1.0, "relation_heads": 4},
        optim={"lr": 5e-3},
        train={"max_steps": 20, "log_every": 10},
        checkpoint={"every_steps": 20},
    )
    cli(write_config(tmp_path / "c.yaml", cfg))
    run = tmp_path / "runs" / "t"
    start, end = [r for r in metrics(run) if "eval/loss" in r]
    assert (start["step"], end["step"]) == (0, 20)
    for term in ("eval/cos", "eval/kl"):
        assert end[term] < start[term], (term, start[term], end[term])
    assert end["eval/relation"] > 0 and end["eval/loss"] < start["eval/loss"]
    states = torch.load(run / "step_00000020" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert states["projection.weight"].shape == (32, 16)
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "projection" in k]
    assert json.loads((run / "model" / "config.json").read_text())["hidden_size"] == 16


def test_frozen_embeddings_are_exported_as_the_teachers_and_the_rest_trains(tmp_path, teacher_dir):
    """student.freeze_embeddings through DeepSpeed ZeRO-2, a checkpoint and the export: the
    exported token embeddings are the teacher's, bit for bit, while the layers have moved;
    student.dropout leaves the exported config with the teacher's dropout."""
    cfg = base_config(teacher_dir, tmp_path, student={"layers": [0, 2], "freeze_embeddings": True, "dropout": 0.0})
    cli(write_config(tmp_path / "c.yaml", cfg))
    teacher = load_file(str(teacher_dir / "model.safetensors"))
    student = load_file(str(tmp_path / "runs" / "t" / "model" / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(student[key], teacher[key])
    layer = "bert.encoder.layer.1.attention.self.query.weight"  # a copy of the teacher's layer 2 that trained
    assert not torch.equal(student[layer], teacher[layer.replace("layer.1.", "layer.2.")])
    exported = json.loads((tmp_path / "runs" / "t" / "model" / "config.json").read_text())
    assert (
        exported["hidden_dropout_prob"]
        == json.loads((teacher_dir / "config.json").read_text())["hidden_dropout_prob"]
        > 0
    )
