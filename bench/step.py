"""`python -m bench.step` (from the repository root): time the full distillation step.

One optimizer step = teacher forward + student forward/backward + optimizer, on random-
initialised BERT models of the given shape and random token batches (15% masked). Variants,
each in its own process (so that peak memory is its own):

  fast-deepspeed  the training path: DeepSpeed engine at world size 1 (ZeRO as configured),
                  distil.objectives.losses.distillation_forward (heads only at the positions a loss reads,
                  logits a chunk at a time), SDPA attention, torch AdamW (foreach)
  fast-torch      the same step without DeepSpeed
  reference       the original DistilBERT formulation: full-vocabulary logits at every position
                  for both models, masked_select, separate softmax/log_softmax, KLDivLoss
                  (batchmean), cross-entropy over every row, eager attention, plain AdamW

Figures: tokens/s (all B x L tokens), step ms (median), peak memory of the step above what
the models and optimizer hold, and MFU = the FLOPs the step must do (see `required_flops`) /
step time / the measured matmul peak of this device and precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the variants run as `python -m bench.step` from here
VARIANTS = ("fast-deepspeed", "fast-torch", "reference")
MASK_ID = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher-layers", type=int, default=4, help="teacher encoder layers")
    p.add_argument("--student-layers", type=int, default=2, help="student encoder layers")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of both models")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x hidden)")
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (the LM head is the largest GEMM)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument(
        "--recipe",
        choices=["distilbert", "masked"],
        default="distilbert",
        help="the loss recipe: KL and cosine over every attended position (DistilBERT's), or masked ones only",
    )
    p.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast precision of the step"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when there is one)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the models in the fast variants")
    from distil.objectives.fused_head import KL_KERNELS

    p.add_argument(
        "--kl-kernel",
        choices=KL_KERNELS,
        default=None,
        help="the fast variants' per-chunk KL: default auto (the fused Triton kernel on a GPU), "
        "compiled with --compile on CPU",
    )
    p.add_argument(
        "--deepspeed-scans",
        action="store_true",
        help="fast-deepspeed: keep DeepSpeed's per-tensor overflow check and gradient norm "
        "(training replaces them with multi-tensor kernels: distil/train/zero_foreach.py)",
    )
    p.add_argument(
        "--data", action="store_true", help="also measure the input pipeline (tokenize, pack, mask) per CPU core"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    return p.parse_args(argv)


def _shape(a) -> dict:
    return {
        "teacher_layers": a.teacher_layers,
        "student_layers": a.student_layers,
        "hidden": a.hidden,
        "heads": a.heads,
        "ffn": a.ffn or 4 * a.hidden,
        "vocab": a.vocab,
        "batch": a.batch,
        "seq": a.seq,
    }


def required_flops(a, n_head_rows: float) -> float:
    """Matmul FLOPs one step cannot avoid: teacher forward, student forward + backward (x3),
    attention scores and values, and the LM head transform + decoder at the rows a loss reads."""
    s = _shape(a)
    h, f, n = s["hidden"], s["ffn"], s["batch"] * s["seq"]
    per_layer = n * (2 * 4 * h * h + 2 * 2 * h * f) + 2 * 2 * s["batch"] * s["seq"] ** 2 * h
    head = n_head_rows * (2 * h * h + 2 * h * s["vocab"])
    return (s["teacher_layers"] * per_layer + head) + 3 * (s["student_layers"] * per_layer + head)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul on this device and dtype."""
    n = 8192 if device.type == "cuda" else (2048 if dtype == torch.float32 else 512)  # CPU half GEMMs can be slow
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        x @ y
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        x @ y
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _models(a, attn: str, device, dtype):
    from transformers import BertConfig, BertForMaskedLM

    from distil.model.student import build_student

    s = _shape(a)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["teacher_layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=max(512, s["seq"]),
        attn_implementation=attn,
    )
    teacher = BertForMaskedLM(config).eval().requires_grad_(False)
    step = max(1, s["teacher_layers"] // s["student_layers"])
    layers = list(range(0, s["teacher_layers"], step))[: s["student_layers"]]
    student = build_student(teacher, layers).train().requires_grad_(True)
    t_dtype = dtype if device.type == "cuda" else torch.float32  # as in training: a half-precision teacher on GPU
    return teacher.to(device, t_dtype), student.to(device), layers


def _batches(a, n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, a.vocab, (a.batch, a.seq), generator=g)
        attn = torch.ones_like(ids)
        chosen = torch.rand(a.batch, a.seq, generator=g) < 0.15
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out.append((torch.where(chosen, torch.full_like(ids, MASK_ID), ids), attn, labels))
    return out


def _loss_config(a):
    from distil.config.sections import LossSection

    return LossSection(recipe=a.recipe, temperature=2.0, alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0)


def _reference_step(a, device, dtype):
    """DistilBERT's step as its training code wrote it (distillation/distiller.py)."""
    teacher, student, _ = _models(a, "eager", device, dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, foreach=False)
    T = 2.0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(masked, attn, labels):
        with autocast:
            s_out = student(input_ids=masked, attention_mask=attn, output_hidden_states=True)
            with torch.no_grad():
                t_out = teacher(input_ids=masked, attention_mask=attn, output_hidden_states=True)
            s_logits, t_logits = s_out.logits, t_out.logits
            sel = (labels > -1) if a.recipe == "masked" else attn.bool()
            mask = sel.unsqueeze(-1).expand_as(s_logits)
            s_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
            t_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
            loss_ce = (
                F.kl_div(F.log_softmax(s_slct / T, dim=-1), F.softmax(t_slct / T, dim=-1), reduction="batchmean") * T**2
            )
            loss_mlm = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), labels.view(-1), ignore_index=-100)
            s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1]
            hmask = sel.unsqueeze(-1).expand_as(s_h)
            s_h = torch.masked_select(s_h, hmask).view(-1, s_h.size(-1))
            t_h = torch.masked_select(t_h, hmask).view(-1, s_h.size(-1))
            loss_cos = F.cosine_embedding_loss(s_h, t_h.to(s_h.dtype), s_h.new_ones(s_h.size(0)))
            loss = 5.0 * loss_ce + 2.0 * loss_mlm + 1.0 * loss_cos
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0, foreach=False)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _fast_step(a, device, dtype, engine: bool):
    from distil.model.student import MaskedLM
    from distil.objectives.losses import DistillationLoss, distillation_forward

    teacher, student, layers = _models(a, "sdpa", device, dtype)
    teacher, model = MaskedLM(teacher), MaskedLM(student)
    if a.compile:
        teacher.model.base_model.compile()
        model.model.base_model.compile()
    from distil.objectives.fused_head import set_kl_kernel

    set_kl_kernel(a.kl_kernel or ("compiled" if a.compile and device.type == "cpu" else "auto"))
    loss_fn = DistillationLoss(_loss_config(a), layers)
    if engine:
        import deepspeed

        from distil.config.schema import DistilConfig
        from distil.train import zero_foreach
        from distil.train.setup import deepspeed_config, init_distributed

        cfg = DistilConfig.model_validate(
            {
                "teacher": {"name_or_path": "bench"},
                "student": {"layers": layers},
                "data": {"sources": ["bench"], "max_len": a.seq},
                "loss": _loss_config(a).model_dump(),
                "optim": {"grad_clip": 5.0},
                "train": {"max_steps": 1, "micro_batch_size": a.batch, "global_batch_size": a.batch},
            }
        )
        init_distributed(device)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=True)
        engine_, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=deepspeed_config(cfg, a.precision, 1)
        )
        if not a.deepspeed_scans:
            zero_foreach.install(engine_.optimizer)  # as training does

        def step(masked, attn, labels):
            terms = distillation_forward(engine_, teacher, loss_fn, masked, attn, labels, device=device)
            engine_.backward(terms["loss"])
            engine_.step()
            return terms["loss"]

        return step

    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=not fused, fused=fused)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(masked, attn, labels):
        with autocast:
            terms = distillation_forward(model, teacher, loss_fn, masked, attn, labels, device=device)
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return terms["loss"]

    return step


class _PeakRSS:
    """Peak resident memory of this process while running. Linux keeps the peak itself (VmHWM)
    and resets it on request (writing 5 to /proc/self/clear_refs): exact, and free. Where that
    is refused, it is sampled every millisecond by a thread, which costs the step time: on 2
    cores the sampler's wake-ups stall the GEMM threads (measured: +0.5 s on a 3.6 s step)."""

    CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self):
        self.peak, self._stop, self._thread = 0, threading.Event(), None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def __enter__(self):
        try:
            with open(self.CLEAR_REFS, "w") as f:
                f.write("5")
            self.peak = self._hwm()
        except (OSError, StopIteration):
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = self._hwm()
        else:
            self._stop.set()
            self._thread.join()


def run_variant(a) -> dict:
    """One variant in this process: warm-up, timed steps, memory."""
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    if a.threads:
        torch.set_num_threads(a.threads)
    step = (
        _reference_step(a, device, dtype)
        if a.variant == "reference"
        else _fast_step(a, device, dtype, a.variant == "fast-deepspeed")
    )
    # Prepared ahead on the host, as the training loop's are; the fast step sends them to the
    # device itself (after finding the loss rows on the host), the reference is handed them there.
    batches = _batches(a, a.warmup + a.steps)
    if a.variant == "reference":
        batches = [tuple(t.to(device) for t in b) for b in batches]
    for b in batches[:1]:
        step(*b)  # allocates the optimizer state: the baseline below includes it
    _sync(device)
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, losses = [], []
    with _PeakRSS() as rss:
        base_rss = rss.peak
        for i, b in enumerate(batches[1:]):
            t0 = time.perf_counter()
            loss = step(*b)
            _sync(device)
            if i >= a.warmup - 1:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.peak - base_rss
    ms = statistics.median(times) * 1e3
    n_rows = a.batch * a.seq if a.recipe == "distilbert" else 0.15 * a.batch * a.seq
    flops = required_flops(a, n_rows)
    peak_flops = matmul_peak(device, dtype)
    return {
        "variant": a.variant,
        "step_ms": ms,
        "tokens_per_s": a.batch * a.seq / (ms / 1e3),
        "peak_mem_mib": peak / 2**20,
        "mfu": flops / (ms / 1e3) / peak_flops,
        "required_gflop": flops / 1e9,
        "matmul_peak_gflops": peak_flops / 1e9,
        "first_loss": losses[0],
        "steps": len(times),
        **_kl_kernel_field(a, device),
    }


def _kl_kernel_field(a, device) -> dict:
    from distil.objectives.fused_head import kl_kernel_in_use

    return {} if a.variant == "reference" else {"kl_kernel": kl_kernel_in_use(device)}


def measure_data_pipeline(seq: int) -> dict:
    """Tokenize + pack + mask (whole-word) on one CPU core, in tokens/s, with the demo corpus and
    the bert-base-uncased vocabulary (all-MiniLM-L6-v2's tokenizer)."""
    from pathlib import Path

    import numpy as np
    from transformers import AutoTokenizer

    from distil.config.sections import MaskingSection
    from distil.data.batches import collate
    from distil.data.masking import Masker
    from distil.data.sequences import Packer, token_ids, tokenizer_spec

    root = Path(__file__).resolve().parents[1]
    tok = AutoTokenizer.from_pretrained(root / "models" / "all-MiniLM-L6-v2")
    lines = [x for x in (root / "data" / "brown" / "brown_sample.txt").read_text().splitlines() if x.strip()]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    flat, lens = Packer(tok.cls_token_id, tok.sep_token_id, seq, "pack", 8)(*token_ids(tokenizer_spec(tok), lines))
    rows = [r.tolist() for r in np.split(flat, np.cumsum(lens)[:-1])]
    t_tok = time.perf_counter() - t0
    n_tokens = sum(len(r) for r in rows)
    masker = Masker(MaskingSection(prob=0.15, whole_word=True), tok, 0)
    t0 = time.perf_counter()
    for b, i in enumerate(range(0, len(rows), 16)):
        ids, attn = collate(rows[i : i + 16], tok.pad_token_id, seq)
        masker(ids, attn, 0, b)
    t_mask = time.perf_counter() - t0
    return {
        "tokens": n_tokens,
        "tokenize_pack_tokens_per_s": n_tokens / t_tok,
        "collate_mask_tokens_per_s": n_tokens / t_mask,
        "pipeline_tokens_per_s_per_core": n_tokens / (t_tok + t_mask),
    }


def _versions() -> dict:
    import deepspeed
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench.step: error: --device cuda but no GPU is visible (fix: --device cpu)", file=sys.stderr)
        return 2
    if a.device == "cpu" and a.precision == "fp16":
        print(
            "bench.step: error: fp16 on CPU is not supported by DeepSpeed (fix: --precision fp32 or bf16)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if a.device == "cuda" else "cpu")
    if a.variant:  # a child: one variant, one JSON line
        from distil.quiet import quiet_libraries

        quiet_libraries()
        print(json.dumps(run_variant(a)))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(
            f"bench.step: error: unknown variant(s) {unknown} (fix: --variants {','.join(VARIANTS)})", file=sys.stderr
        )
        return 2
    own = [x for x in (argv if argv is not None else sys.argv[1:]) if x not in ("--json", "--data")]
    results = {}
    for v in variants:
        r = subprocess.run(
            [sys.executable, "-m", "bench.step", *own, "--variant", v], capture_output=True, text=True, cwd=ROOT
        )
        if r.returncode != 0:
            print(f"bench.step: variant {v} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[v] = json.loads(r.stdout.strip().splitlines()[-1])
    report = {
        "shape": _shape(a),
        "recipe": a.recipe,
        "precision": a.precision,
        "device": a.device,
        "compile": a.compile,
        "date": time.strftime("%Y-%m-%d"),
        "versions": _versions(),
        "results": results,
    }
    ref = results.get("reference")
    if ref:
        for v, r in results.items():
            if v != "reference":
                r["speedup_vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r["memory_vs_reference"] = r["peak_mem_mib"] / ref["peak_mem_mib"] if ref["peak_mem_mib"] > 0 else None
    if a.data:
        report["data_pipeline"] = measure_data_pipeline(a.seq)
    print(json.dumps(report, indent=1) if a.json else format_report(report))
    return 0


def format_report(r: dict) -> str:
    s = r["shape"]
    lines = [
        f"teacher {s['teacher_layers']}L x {s['hidden']} ({s['heads']} heads, FFN {s['ffn']}) -> student {s['student_layers']}L, "
        f"vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']}, recipe {r['recipe']}, {r['precision']} on {r['device']}",
        f"{'variant':16s} {'tokens/s':>10s} {'step ms':>9s} {'peak MiB':>9s} {'MFU':>6s} {'speed x':>8s} {'mem x':>6s}",
    ]
    for v, x in r["results"].items():
        sp = f"{x['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in x else "-"
        mem = f"{x['memory_vs_reference']:.2f}" if x.get("memory_vs_reference") is not None else "-"
        lines.append(
            f"{v:16s} {x['tokens_per_s']:10.0f} {x['step_ms']:9.1f} {x['peak_mem_mib']:9.0f} {x['mfu']:6.1%} {sp:>8s} {mem:>6s}"
        )
    if "data_pipeline" in r:
        d = r["data_pipeline"]
        lines.append(
            f"input pipeline, one core: tokenize+pack {d['tokenize_pack_tokens_per_s']:,.0f} tok/s, "
            f"collate+mask {d['collate_mask_tokens_per_s']:,.0f} tok/s, together {d['pipeline_tokens_per_s_per_core']:,.0f} tok/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
