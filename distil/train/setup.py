"""Everything a worker sets up before its first step, and the driver checks before any worker
starts: the precision for the device, the teacher's tokenizer, the run's prepared data, the
DeepSpeed config and learning-rate schedule, and the process group.

`load_inputs()` validates everything that can be wrong with the input and opens (or builds) the
data; it writes nothing but the prepared data.
"""

from __future__ import annotations

# Imports inside functions: DeepSpeed picks its accelerator when it is imported: after
# quiet_libraries() set DS_ACCELERATOR on a machine without a GPU.
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch
import torch.distributed as dist

from distil.config.schema import DistilConfig
from distil.data.prepared import open_prepared, sequences_of
from distil.data.shards import PreparedData, TokenSplit
from distil.errors import UserError
from distil.model.teacher import load_teacher_config, load_tokenizer, validate_against_teacher
from distil.train.budget import PLAN_AT


def check_precision(cfg: DistilConfig, gpu: bool) -> str:
    """The training dtype for workers with (or without) a GPU; refuses what the device can't do."""
    dtype = cfg.precision.dtype
    if dtype == "auto":
        dtype = "fp16" if gpu else "fp32"
    if dtype == "fp16" and not gpu:
        raise UserError(
            "fp16 training needs a GPU; DeepSpeed refuses fp16 on CPU",
            where="precision.dtype",
            fix="use dtype: auto (fp32 on CPU), fp32 or bf16, or run on GPU workers",
        )
    if dtype == "bf16" and gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 support", where="precision.dtype", fix="use dtype: fp16")
    return dtype


def resolve_precision(cfg: DistilConfig) -> tuple[torch.device, str]:
    want = cfg.precision.device
    cuda = torch.cuda.is_available()
    if want == "cuda" and not cuda:
        raise UserError(
            "device 'cuda' requested but no GPU is visible", where="precision.device", fix="use device: auto or cpu"
        )
    device = torch.device("cuda" if (want == "cuda" or (want == "auto" and cuda)) else "cpu")
    return device, check_precision(cfg, gpu=device.type == "cuda")


@dataclass
class RunInputs:
    cfg: DistilConfig
    tokenizer: object
    train: TokenSplit
    eval: TokenSplit
    counts: np.ndarray | None
    device: torch.device
    dtype: str
    extra_eval: dict[str, list[list[int]]]  # eval.sources: {name: sequences}, never trained on


def build_data(
    cfg: DistilConfig,
    tokenizer,
    world_size: int,
    log=print,
    use_ray: bool | None = None,
    fingerprint: str | None = None,
) -> PreparedData:
    """The run's prepared sequences (tokenized once, see distil/data/prepared.py); refuses a corpus
    too small for one batch."""
    per_step = cfg.train.global_batch_size  # (the sequences one step trains: at least that many)
    cfg.check_batch_split(world_size)  # (checked on the driver too; this is the worker's actual world size)
    return open_prepared(cfg, tokenizer, per_step, log, use_ray=use_ray, fingerprint=fingerprint)


def load_inputs(cfg: DistilConfig, world_size: int = 1, fingerprint: str | None = None) -> RunInputs:
    """Validate the run against the teacher, the device and the data; build the sequences (or,
    with `fingerprint`, open the data a Ray driver prepared)."""
    validate_against_teacher(cfg, load_teacher_config(cfg))
    device, dtype = resolve_precision(cfg)
    tokenizer = load_tokenizer(cfg)
    log = (lambda m: print(m, flush=True)) if int(os.environ.get("RANK", "0")) == 0 else (lambda _: None)
    started = time.perf_counter()
    store = build_data(cfg, tokenizer, world_size, log=log, fingerprint=fingerprint)
    log(
        f"data {store.manifest['fingerprint']}: {len(store['train']):,} training / {len(store['eval']):,} held-out sequences, "
        f"opened in {time.perf_counter() - started:.1f} s"
    )
    counts = store.counts() if cfg.masking.smoothing is not None else None
    return RunInputs(cfg, tokenizer, store["train"], store["eval"], counts, device, dtype, extra_eval(cfg, tokenizer))


def extra_eval(cfg: DistilConfig, tokenizer) -> dict[str, list[list[int]]]:
    """eval.sources, each as its first data.eval_max_sequences sequences (tokenized here, the
    way preparation does; small), by a name made from the file's: {name: sequences}."""

    out = {}
    for source in cfg.eval.sources:
        name = re.sub(r"[^A-Za-z0-9]+", "_", PurePosixPath(source.rstrip("/")).stem).strip("_").lower() or "extra"
        one = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [source]})})
        out[name] = sequences_of(one, tokenizer, cfg.data.eval_max_sequences)
    return out


def deepspeed_config(cfg: DistilConfig, dtype: str, world_size: int, load_universal: bool = False) -> dict:
    """`load_universal`: the engine will load a checkpoint converted to DeepSpeed's universal
    layout, i.e. one written by another number of workers (see distil/runs/reshard.py)."""
    t, z, p = cfg.train, cfg.zero, cfg.precision
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": z.stage,
            "overlap_comm": z.overlap_comm,
            "contiguous_gradients": z.contiguous_gradients,
            "reduce_bucket_size": z.reduce_bucket_size,
            "allgather_bucket_size": z.allgather_bucket_size,
        },
        "fp16": {
            "enabled": dtype == "fp16",
            "loss_scale": 0,
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": dtype == "bf16"},
        # A torch AdamW is handed in: DeepSpeed's fused Adam would JIT-compile on a CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }


def lr_lambda(cfg: DistilConfig, planned_end: Callable[[], int | None] = lambda: None):
    """Linear warmup over warmup_ratio x max_steps, then constant or linear decay to max_steps.

    With a time budget's plan (`planned_end()`: the step the plan ends at, None until it is made at
    step PLAN_AT, distil/train/budget.py) the steps after PLAN_AT follow the schedule of a run of
    the planned steps -- warmup_ratio x plan of warmup, decay to 0 at the plan -- so a plan shorter
    than the warmup towards max_steps still ends at 0 (not part-way up the warmup). A warmup still
    going at the plan is re-sloped to reach the peak at the planned warmup's end; one that should
    already be over is."""
    ratio, decay = cfg.optim.warmup_ratio, cfg.optim.schedule != "constant"
    warmup = int(ratio * cfg.train.max_steps)

    def f(step: int) -> float:
        end = planned_end() if step > PLAN_AT else None
        end_warmup = warmup if end is None else int(ratio * end)
        if end_warmup == warmup:  # no plan, or one that keeps the warmup: the schedule towards `end`
            if step < warmup:
                return (step + 1) / warmup
        elif step < end_warmup:  # (then end_warmup - 1 > step > PLAN_AT, and PLAN_AT < warmup)
            at_plan = (PLAN_AT + 1) / warmup  # the warmup's rate at the plan, joined to the peak
            return at_plan + (1 - at_plan) * (step - PLAN_AT) / (end_warmup - 1 - PLAN_AT)
        total = end or cfg.train.max_steps
        return max(0.0, (total - step) / max(1, total - end_warmup)) if decay else 1.0

    return f


def init_distributed(device: torch.device) -> None:
    """Join the process group Ray Train made, or make a one-process group for a local run."""
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks at start-up: minutes
        # on a cold cache, a compiler at run time, and a hang forever if a killed process left
        # its build lock behind. gloo's all-reduce is what we use instead.
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
