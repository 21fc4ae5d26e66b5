"""Run by tests/unit/test_zero_foreach.py in its own process (it starts a one-process gloo group):
a ZeRO-2 engine on the CPU after one backward, DeepSpeed's per-tensor scans against the
multi-tensor ones of distil.train.zero_foreach and against an independent plain-torch gradient norm.
Prints one JSON line."""

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

from distil.train import zero_foreach  # noqa: E402
from distil.train.setup import init_distributed  # noqa: E402

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
plain = copy.deepcopy(model)
x, y = torch.randn(32, 16), torch.randn(32, 8)
init_distributed(torch.device("cpu"))
config = {
    "train_micro_batch_size_per_gpu": 32,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
}
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
engine.backward(torch.nn.functional.mse_loss(engine(x), y))
torch.nn.functional.mse_loss(plain(x), y).backward()

out = {"installed": zero_foreach.install(opt), "n_grads": len(opt.averaged_gradients[0])}
grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
out["norm_deepspeed"] = float(DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params))
out["norm_foreach"] = float(opt.get_grad_norm_direct(grads, params))
out["norm_plain_torch"] = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
overflow = {}
for case, value in (("finite", None), ("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
    if value is not None:
        g = grads[len(grads) // 2]
        saved = g.view(-1)[3].item()
        g.view(-1)[3] = value
    overflow[case] = [
        bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt)),
        bool(opt.has_overflow_partitioned_grads_serial()),
    ]
    if case == "nan":
        out["norm_with_nan"] = [
            float(DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)),
            float(opt.get_grad_norm_direct(grads, params)),
        ]
    if value is not None:
        g.view(-1)[3] = saved
out["overflow"] = overflow
engine.step()  # the patched methods inside DeepSpeed's own step
out["stepped"] = engine.global_steps
print(json.dumps(out))
