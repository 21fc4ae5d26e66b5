"""The benchmark in its short mode: its figures are consistent with each other and with an
independent FLOP count (speed itself is never asserted in tests; see bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = [
    "--teacher-layers",
    "2",
    "--student-layers",
    "1",
    "--hidden",
    "32",
    "--heads",
    "2",
    "--vocab",
    "500",
    "--batch",
    "4",
    "--seq",
    "16",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--threads",
    "1",
]


def test_required_flops_by_hand():
    from bench.step import parse_args, required_flops

    a = parse_args(TINY)
    n, h, f, v = 4 * 16, 32, 128, 500
    layer = n * (8 * h * h + 4 * h * f) + 4 * 4 * 16 * 16 * h  # QKV+out, FFN, scores and values
    rows = n  # distilbert recipe: every token goes through the heads
    head = rows * (2 * h * h + 2 * h * v)
    assert required_flops(a, rows) == (2 * layer + head) + 3 * (1 * layer + head)


@pytest.mark.parametrize("recipe", ["distilbert", "masked"])
def test_short_mode_figures(recipe):
    r = subprocess.run(
        [sys.executable, "-m", "bench.step", *TINY, "--recipe", recipe, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    res = rep["results"]
    assert set(res) == {"fast-deepspeed", "fast-torch", "reference"}
    # An independent FLOP count of one step (the by-hand formula above): 2 teacher and 1 student
    # layers, forward (x1) and, for the student, backward (x2); the MLM head on every token for
    # distilbert, on the expected masked share (15%) for masked.
    n, h, f, v = 4 * 16, 32, 128, 500
    layer, head_row = n * (8 * h * h + 4 * h * f) + 4 * 4 * 16 * 16 * h, 2 * h * h + 2 * h * v
    flops = 5 * layer + 4 * head_row * (n if recipe == "distilbert" else 0.15 * n)
    for name, x in res.items():
        assert x["steps"] == 2 and x["step_ms"] > 0
        assert x["tokens_per_s"] == pytest.approx(4 * 16 / (x["step_ms"] / 1e3))  # 4 x 16 tokens a step
        assert x["required_gflop"] == pytest.approx(flops / 1e9, rel=1e-12)
        assert x["mfu"] == pytest.approx(flops / (x["step_ms"] / 1e3) / (x["matmul_peak_gflops"] * 1e9), rel=1e-6), name
        if name != "reference":
            assert x["kl_kernel"] == "eager"  # auto: the Triton kernel is for GPUs
            assert x["speedup_vs_reference"] == pytest.approx(x["tokens_per_s"] / res["reference"]["tokens_per_s"])
    # (Loss values are not compared here: dropout draws differ between the variants. Equal
    # losses and gradients of the fast and the reference formulation: tests/unit/test_losses.py.)
    assert rep["versions"]["torch"] and rep["shape"]["vocab"] == 500


def test_bad_options_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "bench.step", "--variants", "fastest"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "unknown variant" in r.stderr


@pytest.mark.parametrize("how", ["kernel", "sampled"])
def test_peak_rss_sees_a_short_lived_allocation(monkeypatch, how):
    """The step's peak memory: a 64 MiB tensor made and freed inside the window shows up in the
    peak, above the resident memory at the start; read from the kernel's reset peak (VmHWM) or,
    where /proc/self/clear_refs is refused, sampled."""
    import time

    import torch

    from bench.step import _PeakRSS

    if how == "sampled":
        monkeypatch.setattr(_PeakRSS, "CLEAR_REFS", "/nonexistent/clear_refs")
    with _PeakRSS() as r:
        start = r.peak
        x = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)  # the sampler's thread needs the GIL for a moment
        del x
    assert (r._thread is None) == (how == "kernel")
    assert 63 * 2**20 <= r.peak - start <= 160 * 2**20


def test_quality_bench_splits_its_text_and_tabulates_seeds(tmp_path):
    """bench/quality.py: the test side is every 10th line and never on the train side; the
    table's cells are the mean and half the spread over seeds (its runs take minutes: the
    bench itself is run by hand, figures in bench/RESULTS.md)."""
    from bench.quality import SOURCE, split_text, table

    train, test = split_text(tmp_path)
    lines = [x for x in SOURCE.read_text(encoding="utf-8").splitlines() if x.strip()]
    tr, te = train.read_text().splitlines(), test.read_text().splitlines()
    assert te == lines[::10] and tr == [x for i, x in enumerate(lines) if i % 10] and len(tr) + len(te) == len(lines)
    rows = [
        {
            "variant": v,
            "seed": s,
            "mlm_accuracy": a,
            "probe_accuracy": p,
            "agreement": g,
            "teacher_mlm_accuracy": tm,
            "teacher_probe_accuracy": 0.4,
        }
        for v, s, a, p, g, tm in [
            ("full", 0, 0.30, 0.35, 0.8, 0.5),
            ("full", 1, 0.34, 0.31, 0.9, 0.6),
            ("no-kl", 0, 0.2, 0.3, 0.7, 0.5),
            ("no-kl", 1, 0.2, 0.3, 0.7, 0.6),
        ]
    ]
    t = table(rows).splitlines()
    assert t[2] == "| full | 0.320 ± 0.020 | 0.330 ± 0.020 | 0.850 ± 0.050 |"
    assert t[3] == "| no-kl | 0.200 ± 0.000 | 0.300 ± 0.000 | 0.700 ± 0.000 |"
    assert (
        t[4] == "| teacher | 0.550 ± 0.050 | 0.400 ± 0.000 | 1 |"
    )  # the teacher per seed: its masks and split are the seed's
