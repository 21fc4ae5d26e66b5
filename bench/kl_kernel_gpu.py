"""The fused KL kernel on a GPU: correctness against fp64 and time against the eager and the
compiled per-chunk math (bias and 1/T included), at the training shape (one chunk of a
bert-base vocabulary).

    python bench/kl_kernel_gpu.py [--rows 4397] [--vocab 30522]
"""

import argparse

import torch
import triton.testing

from distil.objectives import fused_head
from distil.objectives.kl_kernel import kl_chunk

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, default=2**27 // 30522)  # the fused loss's chunk on a GPU
p.add_argument("--vocab", type=int, default=30522)
a = p.parse_args()
dev = torch.device("cuda")
pad = -(-a.vocab // 64) * 64
torch.manual_seed(0)
s = (torch.randn(a.rows, pad, device=dev) * 3).half()[:, : a.vocab]  # strided, as the padded GEMM gives
t = (torch.randn(a.rows, pad, device=dev) * 3).half()[:, : a.vocab]
coef = torch.full((), 0.01, device=dev)
out = torch.full((a.rows, pad), float("nan"), device=dev, dtype=torch.float16)[:, : a.vocab]

kl = kl_chunk(s, t, coef, out)
ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
ref_kl = float((lt.exp() * (lt - ls)).sum())
err_g = float((out.double() - 0.01 * (ls.exp() - lt.exp())).abs().max())
print(
    f"rows {a.rows} x vocab {a.vocab}: kl {float(kl):.6f} vs fp64 {ref_kl:.6f} (rel {abs(float(kl) - ref_kl) / ref_kl:.1e}), "
    f"max |g - g64| {err_g:.2e} (fp16 ulp at 0.01: {0.01 * 2**-10:.1e}), NaN left: {bool(out.isnan().any())}"
)
del ls, lt

# The fused loss hands each implementation the raw GEMM output (x @ W.T) and the bias. The eager
# one overwrites it (repeated calls keep it finite: (x + b) / T again and again tends to 2b); the
# Triton kernel adds the bias and 1/T as it loads.
bias = torch.randn(a.vocab, device=dev).half()
fused_head.set_kl_kernel("compiled")
impls = (("eager", fused_head._kl_eager), ("compiled", fused_head._compiled_kl), ("triton", fused_head._kl_triton))
for name, fn in impls:
    ms = triton.testing.do_bench(
        lambda fn=fn: fn(s, bias, t, bias, 0.5, coef, out), warmup=100, rep=500, return_mode="median"
    )
    moved = 2 * 2 * s.numel() * 2 + out.numel() * 2  # s and t read twice, g written once (fp16)
    print(f"{name:9s} {ms:7.3f} ms  ({moved / (ms * 1e-3) / 1e9:6.0f} GB/s of the fused kernel's minimum traffic)")
