"""ZeRO-1/2's two per-step gradient scans as multi-tensor kernels.

Every optimizer step DeepSpeed's ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer, deepspeed 0.19)
scans the gradients of its partition twice, one tensor at a time:

- the fp16 overflow check (`has_overflow_partitioned_grads_serial`): amax, amin, two isfinite,
  logical_and, logical_not and an add per gradient tensor, ~7 kernel launches each;
- the global norm for clipping (`get_grad_norm_direct`): a cast to fp64 and a vector_norm each.

For a 6-layer BERT student that is ~100 tensors and ~1,000 launches from Python per step. On a
GPU the step is then bound by the host (measured on an H100: ~24 ms of host time a step in the
overflow check alone, against ~42 ms of device time for the whole step). Here both scans are
`torch._foreach_norm` calls, a handful of multi-tensor kernels, with the same results: the
overflow flag is set exactly when some element is inf or NaN (the inf-norm propagates both), and
the norm is the L2 norm of all gradients with the same sentinel (-1) for inf/NaN. Norms are
accumulated in fp32 per tensor and combined in fp64 (DeepSpeed: fp64 throughout), so clipping
coefficients agree to ~1e-7 relative.

Only the plain data-parallel case is replaced; model or pipeline parallelism, MoE and CPU offload
keep DeepSpeed's own methods.
"""

from __future__ import annotations

# Imports inside functions: DeepSpeed (see distil/train/setup.py).
import types

import torch


def install(optimizer) -> bool:
    """Give this ZeRO-1/2 optimizer instance the multi-tensor scans. Returns whether it did (not
    for other optimizers or the parallel layouts listed above)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return False
    if optimizer.cpu_offload or optimizer.has_moe_layers or optimizer.model_parallel_world_size > 1:
        return False
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_has_overflow, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm, optimizer)
    return True


def _has_overflow(self) -> torch.Tensor:
    grads = [
        g
        for i in range(len(self.bit16_groups))
        for g in (self.averaged_gradients[i] or [])
        if g is not None and g.numel()
    ]
    if not grads:
        return torch.zeros([1], dtype=torch.bool, device=self.device)
    amax = torch.stack(torch._foreach_norm(grads, float("inf")))  # inf or NaN iff some element is
    return (~torch.isfinite(amax)).any().reshape(1)


def _grad_norm(self, gradients, params, norm_type=2):
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if float(norm_type) != 2.0 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)
    # As DeepSpeed pairs them: ZeRO's alignment padding left out, then zipped with the params.
    grads = [g.detach() for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    if grads:
        # fp32 out: the norm of loss-scaled fp16 gradients can exceed fp16's range.
        total = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total
