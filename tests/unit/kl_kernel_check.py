"""Run by tests/unit/test_losses.py under TRITON_INTERPRET=1: the Triton KL kernel's results
against fp64, and the fused loss with that kernel against the eager path. Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_losses import _fused_run, _head_case  # noqa: E402

import distil.objectives.fused_head as fused_head  # noqa: E402
from distil.objectives import kl_kernel  # noqa: E402

out = {"kernel": {}}
for v in (300, 5000):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(v)
        rows, inv_T = 6, 0.5
        s = (torch.randn(rows, v + 20, generator=g) * 4).to(dtype)[:, :v]  # raw logits, strided rows
        t = (torch.randn(rows, v, generator=g) * 4).to(dtype)
        s_b = torch.randn(v, generator=g).to(dtype)  # a model's bias: its dtype
        t_b = torch.randn(v, generator=g)  # fp32, as under autocast
        buf = torch.full((rows, v + 20), 7.0, dtype=dtype)
        coef = torch.tensor(0.37)
        s_in, t_in = s.clone(), t.clone()
        kl = kl_kernel.kl_chunk(s, t, coef, buf[:, :v], s_b, t_b, inv_T)
        ls = torch.log_softmax((s.double() + s_b.double()) * inv_T, -1)
        lt = torch.log_softmax((t.double() + t_b.double()) * inv_T, -1)
        ls0, lt0 = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
        out["kernel"][f"{str(dtype).split('.')[1]}-{v}"] = {
            "kl": float(kl),
            "ref_kl": float((lt.exp() * (lt - ls)).sum()),
            "g_err": float((buf[:, :v].double() - 0.37 * (ls.exp() - lt.exp())).abs().max()),
            "padding_untouched": bool((buf[:, v:] == 7.0).all()),
            "inputs_untouched": bool(torch.equal(s, s_in) and torch.equal(t, t_in)),
            "kl_without_grad": float(kl_kernel.kl_chunk(s, t, coef, None, s_b, t_b, inv_T)),
            "kl_no_bias": float(kl_kernel.kl_chunk(s, t, coef, None)),
            "ref_kl_no_bias": float((lt0.exp() * (lt0 - ls0)).sum()),
        }

case = _head_case(5)
want = _fused_run(case)
fused_head.vocab_multiple = lambda device: 64
fused_head.set_kl_kernel("triton")
got = _fused_run(case)
# Per tensor: the largest error relative to the tensor's largest element.
errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(want[0] + want[1], got[0] + got[1])]
out["fused"] = {"n": len(errs), "max_rel_err": max(errs), "errs": errs}
print(json.dumps(out))
