"""Where a benchmark step's time goes: torch.profiler over a few steps of one variant (device
time by kernel), and with --host, cProfile of the same steps (host time by Python function:
what a CPU-bound step, e.g. DeepSpeed's per-parameter hooks, spends its time on).

    python -m bench.profile_step [bench.step options] --variant fast-torch [--host]
"""

import cProfile
import io
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.step import _batches, _fast_step, _reference_step, parse_args

host = "--host" in sys.argv
a = parse_args([x for x in sys.argv[1:] if x != "--host"])
device = torch.device(a.device)
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
variant = a.variant or "fast-torch"
step = (
    _reference_step(a, device, dtype)
    if variant == "reference"
    else _fast_step(a, device, dtype, variant == "fast-deepspeed")
)
batches = _batches(a, 9)
if variant == "reference":
    batches = [tuple(t.to(device) for t in b) for b in batches]
for b in batches[:3]:
    step(*b)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
with profile(activities=activities) as prof:
    for b in batches[3:6]:
        step(*b)
    if device.type == "cuda":
        torch.cuda.synchronize()
key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
if host:
    pr = cProfile.Profile()
    pr.enable()
    for b in batches[6:]:
        step(*b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    pr.disable()
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(order).print_stats(30)
        print(f"--- host time over 3 steps, by {order} ---")
        print("\n".join(line[:160] for line in buf.getvalue().splitlines()[6:]))
