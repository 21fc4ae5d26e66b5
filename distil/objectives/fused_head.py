"""The LM heads' terms -- KL with temperature, MLM and logit MSE -- fused into one pass over
chunks of rows, so no [positions x vocab] logits tensor ever exists whole (the bulk of a
distillation step's memory), and the rows they read worked out on the host.

`fused_head_loss` is what distil/objectives/losses.py calls on the training path; the KL of each chunk
and its gradient run as a Triton kernel on a GPU (distil/objectives/kl_kernel.py), as Inductor-compiled
C++ or eagerly in cache-sized blocks on a CPU (`set_kl_kernel`).
"""

from __future__ import annotations

# Imports inside functions: the Triton kernel's module only where it runs (a GPU).
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distil.data.masking import IGNORE
from distil.model.student import HeadOutput


def loss_positions(recipe: str, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*L) of the positions the distillation terms read."""
    keep = labels.reshape(-1) != IGNORE if recipe == "masked" else attention_mask.reshape(-1).bool()
    return torch.nonzero(keep).squeeze(1)


@dataclass
class Rows:
    """Which rows the terms read, worked out on the host with the batch: `nonzero` or a count
    on a GPU tensor makes the host wait for the GPU, which would stall the step's launches."""

    positions: torch.Tensor  # flat B*L indices of the rows the distillation terms read
    targets: torch.Tensor  # the labels at those rows (IGNORE where not masked)
    mlm_rows: torch.Tensor  # indices into `positions` of the masked rows
    mlm_rows_host: torch.Tensor  # the same, on the host: per-chunk slices without a sync
    n_masked: int

    @classmethod
    def of(cls, recipe: str, attention_mask: torch.Tensor, labels: torch.Tensor) -> "Rows":
        positions = loss_positions(recipe, attention_mask.cpu(), labels.cpu())
        targets = labels.cpu().reshape(-1).index_select(0, positions)
        mlm = torch.nonzero(targets != IGNORE).squeeze(1)
        return cls(positions, targets, mlm, mlm, len(mlm))

    def to(self, device: torch.device) -> "Rows":
        move = (
            (lambda t: t.pin_memory().to(device, non_blocking=True))
            if device.type == "cuda"
            else (lambda t: t.to(device))
        )
        return Rows(move(self.positions), move(self.targets), move(self.mlm_rows), self.mlm_rows_host, self.n_masked)


def _biased(x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x + b in fp32, as a new tensor (x is a chunk's raw logits, x @ W.T)."""
    return x.float() + b.float() if b is not None else x.float().clone()


def _scaled_bias(b: torch.Tensor | None, inv_T: float, dtype: torch.dtype) -> torch.Tensor | None:
    return None if b is None else (b * inv_T).to(dtype)


def _to_scaled_logits_(raw: torch.Tensor, b_T: torch.Tensor | None, inv_T: float) -> torch.Tensor:
    """raw := raw * inv_T + b_T in place (b_T = bias / T, _scaled_bias): logits / T in one pass
    (a GEMM with the bias in its output, addmm, costs the same pass as a copy of the bias first)."""
    if b_T is None:
        return raw.mul_(inv_T)
    return torch.add(b_T, raw, alpha=inv_T, out=raw)


def _kl_rows_(s_T: torch.Tensor, t_T: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Rows' sum of KL(p_t || p_s) from logits / T (overwritten: scratch); writes coef * (p_s - p_t),
    the gradient w.r.t. the logits (times T / n), into `out` when given. fp32 math, two exps an
    element: KL = sum_j p_t,j (t_j - s_j) + logsumexp(s) - logsumexp(t)."""
    s, t = s_T.float(), t_T.float()  # the same tensors in fp32; copies otherwise
    e_s = out if out is not None and out.dtype == torch.float32 else torch.empty_like(s)
    m_s, m_t = s.amax(1, keepdim=True), t.amax(1, keepdim=True)
    z_s = torch.sub(s, m_s, out=e_s).exp_().sum(1, keepdim=True)
    t_minus_s = torch.sub(t, s, out=s)
    e_t = t.sub_(m_t).exp_()
    z_t = e_t.sum(1, keepdim=True)
    kl = (torch.linalg.vecdot(e_t, t_minus_s) / z_t.squeeze(1)).sum() + (m_s + z_s.log() - m_t - z_t.log()).sum()
    if out is not None:
        e_s.mul_(coef / z_s).sub_(e_t.mul_(coef / z_t))
        if e_s is not out:
            out.copy_(e_s)
    return kl


def _kl_eager(s_raw, s_b, t_raw, t_b, inv_T, coef, out):
    """The eager KL of a chunk of raw logits, a block of rows at a time. On a CPU a block is ~1 MiB
    a tensor, so that its ~10 passes run in cache rather than from memory (a 549-row chunk: 190 ->
    95 ms); on a GPU one block, i.e. one launch per pass."""
    n, v = s_raw.shape
    rows = max(1, 2**18 // v) if s_raw.device.type == "cpu" else n
    s_bT, t_bT = _scaled_bias(s_b, inv_T, s_raw.dtype), _scaled_bias(t_b, inv_T, t_raw.dtype)
    total = s_raw.new_zeros((), dtype=torch.float32)
    for i in range(0, n, rows):
        j = slice(i, i + rows)
        s_T, t_T = _to_scaled_logits_(s_raw[j], s_bT, inv_T), _to_scaled_logits_(t_raw[j], t_bT, inv_T)
        total += _kl_rows_(s_T, t_T, coef, None if out is None else out[j])
    return total


def _kl_fused_math(s_raw, s_b, t_raw, t_b, inv_T, coef, out):
    """The same math as one function of the raw logits, for torch.compile to fuse into ~3 kernels
    (C++ on a CPU: a 549-row chunk in ~60 ms)."""
    s = _biased(s_raw, s_b) * inv_T
    t = _biased(t_raw, t_b) * inv_T
    m_s, m_t = s.amax(1, keepdim=True), t.amax(1, keepdim=True)
    e_s, e_t = torch.exp(s - m_s), torch.exp(t - m_t)
    z_s, z_t = e_s.sum(1, keepdim=True), e_t.sum(1, keepdim=True)
    kl = ((e_t * (t - s)).sum(1, keepdim=True) / z_t + m_s + z_s.log() - m_t - z_t.log()).sum()
    if out is not None:
        out.copy_(coef * (e_s / z_s - e_t / z_t))
    return kl


def _kl_triton(s_raw, s_b, t_raw, t_b, inv_T, coef, out):
    from distil.objectives import kl_kernel

    return kl_kernel.kl_chunk(s_raw, t_raw, coef, out, s_b, t_b, inv_T)  # bias and 1/T inside the kernel


KL_KERNELS = ("auto", "eager", "compiled", "triton")
_kl_kernel = "auto"
_compiled_kl = None


def set_kl_kernel(name: str) -> None:
    """Which implementation computes each chunk's KL and its gradient: 'triton' (the fused
    kernel in distil.objectives.kl_kernel, GPU), 'compiled' (torch.compile of the math: C++ on a CPU, where
    it is the fastest; Triton on a GPU), 'eager', or 'auto' (triton on a GPU where Triton is
    installed, else eager: compiling costs a C++ compiler and a first-call compile)."""
    global _kl_kernel, _compiled_kl
    if name not in KL_KERNELS:
        raise ValueError(f"unknown KL kernel {name!r} (one of {', '.join(KL_KERNELS)})")
    if name == "compiled" and _compiled_kl is None:
        _compiled_kl = torch.compile(_kl_fused_math, dynamic=True)
    _kl_kernel = name


def kl_kernel_in_use(device: torch.device) -> str:
    """The KL implementation chunks on this device run with ('auto' resolved)."""
    if _kl_kernel != "auto":
        return _kl_kernel
    if device.type != "cuda":
        return "eager"
    from distil.objectives import kl_kernel  # (imports Triton)

    return "triton" if kl_kernel.available() else "eager"


def _kl_impl(device: torch.device):
    """f(s_raw, s_bias, t_raw, t_bias, 1/T, coef, out) -> the chunk's KL sum; the raw logits
    (x @ W.T, no bias) are scratch (the eager form overwrites them)."""
    return {"triton": _kl_triton, "compiled": _compiled_kl, "eager": _kl_eager}[kl_kernel_in_use(device)]


def vocab_multiple(device: torch.device) -> int:
    """The decoder's rows are padded to a multiple of this (see _FusedHeadLoss)."""
    return 64 if device.type == "cuda" else 1


def _padded(x: torch.Tensor | None, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x (in `dtype`, if given) with zero rows appended up to `rows` (one copy a step, not one a chunk)."""
    if x is None:
        return None
    x = x if dtype is None else x.to(dtype)
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros((rows - x.shape[0],) + x.shape[1:])])


class _FusedHeadLoss(torch.autograd.Function):
    """alpha_kl * kl + alpha_mlm * mlm + alpha_mse * mse from the heads' features, a chunk of rows
    at a time: each chunk's logits are made, used and dropped, and their gradient is folded into
    the gradients of the features, the decoder weight and bias right away (the loss is a sum over
    rows, so this is exact). The [rows x vocab] logits never exist whole, neither in the forward
    nor kept for the backward. Also returns the three terms, detached, for logging.

    On a GPU the decoder is padded with zero rows to a multiple of 64: a vocabulary like 30522
    makes every logits row misaligned for the tensor-core GEMM kernels (cuBLAS then falls back
    to older, slower ones). The padding columns are computed and never read."""

    @staticmethod
    def forward(
        ctx,
        s_feat,
        s_w,
        s_b,
        t_feat,
        t_w,
        t_b,
        targets,
        mlm_rows,
        mlm_rows_host,
        temperature,
        a_kl,
        a_mlm,
        a_mse,
        chunk,
    ):
        n, v = s_feat.shape[0], s_w.shape[0]
        grad = any(ctx.needs_input_grad[:3])  # (grad mode is off inside forward)
        acc = torch.float32
        dev = s_feat.device.type
        # Under autocast the GEMMs below must run in its dtype too (an in-place fp32 GEMM would not).
        compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else s_feat.dtype
        m = vocab_multiple(s_feat.device)
        vp = -(-v // m) * m
        s_wp, t_wp = _padded(s_w, vp, compute), _padded(t_w, vp)
        g_feat = torch.zeros_like(s_feat) if grad else None
        g_w = torch.zeros((vp, s_w.shape[1]), dtype=acc, device=s_w.device) if grad else None
        g_b = torch.zeros(v, dtype=acc, device=s_w.device) if grad and s_b is not None else None
        # d loss / d logits, one chunk at a time, in the GEMMs' dtype; its padding columns stay 0.
        g_buf = torch.empty((min(chunk, n), vp), dtype=compute, device=s_feat.device) if grad else None
        if grad:
            g_buf[:, v:].zero_()
        # On a CPU the chunks' logits go into two buffers made once: a new [chunk x vocab] tensor
        # a chunk is a fresh mmap each time (page faults, pages zeroed by the kernel). A GPU's
        # caching allocator reuses memory by itself, and autocast takes no out= tensors.
        bufs = None
        if dev == "cpu" and not torch.is_autocast_enabled(dev) and (a_kl or a_mse):
            bufs = [torch.empty((min(chunk, n), vp), dtype=x.dtype) for x in (s_feat, t_feat)]
        sums = torch.zeros(3, dtype=torch.float64, device=s_feat.device)  # kl, mlm, mse
        n_masked = max(len(mlm_rows_host), 1)
        # Each chunk's masked rows, sliced by bounds found on the host (no device sync).
        bounds = torch.searchsorted(mlm_rows_host, torch.arange(0, n + chunk, chunk)).tolist()
        T = temperature
        kl_coef = torch.full((), a_kl * T / max(n, 1), device=s_feat.device)  # a fill kernel, not a copy from the host
        kl_fn = _kl_impl(s_feat.device)
        for c, i in enumerate(range(0, n, chunk)):
            f = s_feat[i : i + chunk]
            g = g_buf[: f.shape[0], :v] if grad else None
            filled = False  # whether g holds this chunk's gradient yet
            at = rows = s_rows = d = None
            if a_mlm and bounds[c + 1] > bounds[c]:
                at = mlm_rows[bounds[c] : bounds[c + 1]]  # this chunk's masked rows
                rows = at - i
            if a_kl or a_mse:  # the chunk's logits without the bias ([:, :v]: not the padding)
                rows_i = f.shape[0]
                s_raw = torch.mm(f, s_wp.t(), **({"out": bufs[0][:rows_i]} if bufs else {}))[:, :v]
                t_raw = torch.mm(t_feat[i : i + chunk], t_wp.t(), **({"out": bufs[1][:rows_i]} if bufs else {}))[:, :v]
                if rows is not None:  # the KL overwrites the logits: the masked rows' first
                    s_rows = _biased(s_raw.index_select(0, rows), s_b)
                if a_mse:
                    d = _biased(s_raw, s_b).sub_(_biased(t_raw, t_b))
                    sums[2] += torch.dot(d.view(-1), d.view(-1))
                if a_kl:  # d(T^2 * KL / n) / ds = T / n * (p_s - p_t)
                    sums[0] += kl_fn(s_raw, s_b, t_raw, t_b, 1.0 / T, kl_coef, g)
                    filled = grad
                del s_raw, t_raw
            if d is not None and grad:
                d.mul_(a_mse * 2.0 / (n * v))
                if filled:
                    g.add_(d)
                else:
                    g.copy_(d)
                    filled = True
            del d
            if rows is not None:
                tgt = targets.index_select(0, at)
                if s_rows is None:
                    s_rows = F.linear(f.index_select(0, rows), s_w, s_b).float()
                lsm = F.log_softmax(s_rows, dim=-1)
                sums[1] -= lsm.gather(1, tgt[:, None]).sum()
                if grad:  # d CE / ds = softmax(s) - onehot
                    p = lsm.exp_()
                    p[torch.arange(p.shape[0], device=p.device), tgt] -= 1.0
                    if not filled:
                        g.zero_()
                        filled = True
                    g.index_add_(0, rows, p.to(g.dtype), alpha=a_mlm / n_masked)
            if filled:
                gp = g_buf[: f.shape[0]]  # with the padding columns: aligned rows for the GEMMs
                g_feat[i : i + chunk] = gp @ s_wp
                if compute == acc:
                    g_w.addmm_(gp.t(), f)
                else:  # half-precision GEMM (fp32 accumulation inside), summed over chunks in fp32
                    g_w.add_(torch.mm(gp.t(), f.to(compute)))
                if g_b is not None:
                    g_b += g.sum(0, dtype=acc)
        kl, mlm, mse = sums[0] / max(n, 1) * T**2, sums[1] / n_masked, sums[2] / max(n * v, 1)
        loss = (a_kl * kl + a_mlm * mlm + a_mse * mse).float()
        if grad:
            ctx.save_for_backward(g_feat, g_w[:v].to(s_w.dtype), g_b.to(s_b.dtype) if g_b is not None else None)
        terms = torch.stack([kl, mlm, mse]).float()
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        g_feat, g_w, g_b = ctx.saved_tensors
        scale = grad_loss.to(g_feat.dtype)
        return (
            g_feat * scale,
            g_w * scale.to(g_w.dtype),
            None if g_b is None else g_b * scale.to(g_b.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_head_loss(
    s_head: HeadOutput,
    t_head: HeadOutput,
    targets: torch.Tensor,
    temperature: float,
    a_kl: float,
    a_mlm: float,
    a_mse: float,
    chunk: int | None = None,
    rows: Rows | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum of the head terms, {term: detached value}); targets are the labels at the rows.
    chunk: rows per chunk; by default as many as keep one fp32 [rows x vocab] buffer near
    64 MiB on CPU (cache-friendly passes) or 512 MiB on GPU (few, large kernels).
    rows: the masked rows found on the host (the training path); without it they are found
    here, at the cost of one device sync."""
    if chunk is None:
        budget = 2**27 if s_head.features.is_cuda else 2**24
        chunk = max(64, budget // s_head.weight.shape[0])
    if rows is None:
        mlm_host = torch.nonzero(targets.cpu() != IGNORE).squeeze(1)
        mlm_rows = mlm_host.to(targets.device)
    else:
        mlm_rows, mlm_host = rows.mlm_rows, rows.mlm_rows_host
    loss, terms = _FusedHeadLoss.apply(
        s_head.features,
        s_head.weight,
        s_head.bias,
        t_head.features.detach(),
        t_head.weight.detach(),
        None if t_head.bias is None else t_head.bias.detach(),
        targets,
        mlm_rows,
        mlm_host,
        float(temperature),
        float(a_kl),
        float(a_mlm),
        float(a_mse),
        chunk,
    )
    names = [k for k, a in (("kl", a_kl), ("mlm", a_mlm), ("mse", a_mse)) if a]
    return loss, {k: terms[i] for i, k in enumerate(("kl", "mlm", "mse")) if k in names}
