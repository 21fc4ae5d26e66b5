"""What the demo's training costs in arithmetic, and so what it takes on a CPU of another speed.

The demo's loop is matrix products, and the 2-core CPUs it runs on differ there far more than in
anything else (bench/RESULTS.md). This counts the floating-point operations of the demo's
optimizer steps with torch's FlopCounterMode (teacher forward, student forward and backward,
the losses), on the demo's own batches: the FLOPs of one step at a width are `a*w + b*w^2` per
row (linear layers; attention, counted on torch's math attention backend: the counter cannot see
the fused CPU kernel), fitted on two widths and checked on a third, then summed over
the widths of all the batches the demo's sampler makes. It then times steps on this machine
and measures its fp32 matmul peak, so the total can be read as minutes at any peak:

    .venv/bin/python bench/demo_flops.py --out bench/results/demo_flops_DATE_CPU.json [--set train.max_steps=900 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import machine  # noqa: E402
from step import matmul_peak  # noqa: E402


def step_flops(trainer, rows: list[list[int]], width: int) -> int:
    """FLOPs of one optimizer step on `rows` cut and padded to `width` (the weights move: a
    real step; their values do not change the count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from distil.data.batches import collate

    ids, attn = collate(
        [r[:width] + [r[-1]] * max(0, width - len(r)) for r in rows], trainer.prep.tokenizer.pad_token_id, width, 1
    )
    masked, labels = trainer.masker(ids, attn, 0, 0, 0)
    # torch's fused CPU attention kernel is invisible to FlopCounterMode (it reads 0); the math
    # backend computes the same products as matmuls, which it counts
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        terms = trainer._forward(trainer.engine, trainer.teacher, masked, attn, labels)
        trainer.engine.backward(terms["loss"])
        trainer.engine.step()
    return fc.get_total_flops()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], help="a config override, as distil train --set")
    ap.add_argument("--time-steps", type=int, default=30, help="steps timed on this machine (after 5 untimed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from distil.config.schema import load_config
    from distil.data.batches import ResumableSampler
    from distil.train.setup import init_distributed, load_inputs
    from distil.train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="demo-flops-")
    cfg = load_config(args.config, [*args.set, f"storage.uri={tmp}", "eval.probe.path=null", "eval.sources=[]"])
    prep = load_inputs(cfg, 1)
    init_distributed(prep.device)
    trainer = Trainer(prep, Path(tmp) / "run", log=lambda *_: None)
    m = cfg.train.micro_batch_size
    rows = prep.train.rows(list(range(m)))
    # per-row FLOPs at width w: a*w + b*w^2, from widths 16 and 64; checked at 32
    f16, f64, f32 = (step_flops(trainer, rows, w) / m for w in (16, 64, 32))
    b = (f64 / 64 - f16 / 16) / (64 - 16)
    a = f16 / 16 - b * 16
    fit_error = (a * 32 + b * 32 * 32) / f32 - 1

    lengths = prep.train.lengths()

    def width(idx) -> int:  # what collate pads a batch to on a CPU
        return int(min(cfg.data.max_len, lengths[idx].max()))

    def batch_flops(w: int) -> float:
        return m * (a * w + b * w * w)

    sampler = ResumableSampler(len(prep.train), cfg.run.seed, lengths if cfg.data.group_by_length else None)
    total = padded = real = 0
    for _ in range(cfg.train.max_steps):
        idx = sampler.next_indices(m, 0, m)
        total += batch_flops(width(idx))
        padded, real = padded + m * width(idx), real + int(lengths[idx].sum())

    for _ in range(5):  # the demo's own batches, in its order
        trainer.train_step()
    times, timed_flops = [], 0.0
    for _ in range(args.time_steps):
        timed_flops += batch_flops(width(trainer.sampler.peek(m, 0, m)))
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    step_flops_mean = total / cfg.train.max_steps
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    out = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "config": args.config,
        "overrides": args.set,
        "steps": cfg.train.max_steps,
        "real_tokens": real,
        "padded_tokens": padded,
        "flops_per_row_fit": {"a": a, "b": b, "error_at_width_32": fit_error},
        "total_tflop": total / 1e12,
        "mean_step_gflop": step_flops_mean / 1e9,
        "timed_steps": args.time_steps,
        "median_step_s": statistics.median(times),
        "achieved_gflops": timed_flops / sum(times) / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "minutes_at_peak": total / peak / 60,
        "minutes_at_achieved": total / (timed_flops / sum(times)) / 60,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
