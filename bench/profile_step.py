"""Where a benchmark step's time goes: torch.profiler over a few steps of one variant.

    python bench/profile_step.py [distil bench options] --variant fast-torch
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from distil.bench import _batches, _fast_step, _reference_step, parse_args

a = parse_args(sys.argv[1:])
device = torch.device(a.device)
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
variant = a.variant or "fast-torch"
step = _reference_step(a, device, dtype) if variant == "reference" else _fast_step(a, device, dtype, variant == "fast-deepspeed")
batches = [tuple(t.to(device) for t in b) for b in _batches(a, 6)]
for b in batches[:3]:
    step(*b)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
with profile(activities=activities) as prof:
    for b in batches[3:]:
        step(*b)
    if device.type == "cuda":
        torch.cuda.synchronize()
key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
