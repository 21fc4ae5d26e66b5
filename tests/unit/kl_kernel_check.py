"""Run by tests/unit/test_losses.py under TRITON_INTERPRET=1: the Triton KL kernel's results
against fp64, and the fused loss with that kernel against the eager path. Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distil.losses as losses  # noqa: E402
from distil import kl_kernel  # noqa: E402
from test_losses import _fused_run, _head_case  # noqa: E402

out = {"kernel": {}}
for v in (300, 5000):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(v)
        rows = 6
        s = (torch.randn(rows, v + 20, generator=g) * 4).to(dtype)[:, :v]
        t = (torch.randn(rows, v, generator=g) * 4).to(dtype)
        buf = torch.full((rows, v + 20), 7.0, dtype=dtype)
        coef = torch.tensor(0.37)
        kl = kl_kernel.kl_chunk(s, t, coef, buf[:, :v])
        ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
        out["kernel"][f"{str(dtype).split('.')[1]}-{v}"] = {
            "kl": float(kl), "ref_kl": float((lt.exp() * (lt - ls)).sum()),
            "g_err": float((buf[:, :v].double() - 0.37 * (ls.exp() - lt.exp())).abs().max()),
            "padding_untouched": bool((buf[:, v:] == 7.0).all()),
            "kl_without_grad": float(kl_kernel.kl_chunk(s, t, coef, None))}

case = _head_case(5)
want = _fused_run(case)
losses.vocab_multiple = lambda device: 64
losses.set_kl_kernel("triton")
got = _fused_run(case)
# Per tensor: the largest error relative to the tensor's largest element.
errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(want[0] + want[1], got[0] + got[1])]
out["fused"] = {"n": len(errs), "max_rel_err": max(errs), "errs": errs}
print(json.dumps(out))
