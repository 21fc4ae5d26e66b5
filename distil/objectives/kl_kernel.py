"""A fused Triton kernel for one chunk of the temperature KL and its gradient (GPU).

Per row r of raw logits x @ W.T (no bias; s = student, t = teacher, any float dtype), with
the logits over T formed as they are loaded, (raw + bias) / T in fp32:

    kl[r] = sum_v p_t (log p_t - log p_s)
    g[r]  = coef * (p_s - p_t)          (d loss / d s, written in g's dtype)

Eagerly this is ~8 passes over fp32 [rows x vocab] temporaries (two log-softmaxes, exp, sub,
dot, exp, sub, mul, then a cast for the backward GEMMs). Here it is two passes over the half-
precision logits and one write of g: pass 1 keeps running maxima and sums of exp (online
softmax, Milakov & Gimelshein 2018) for both rows and, rescaled the same way, sum e^(t-m_t)(t-s),
from which kl = A / Z_t - (m_t + log Z_t) + (m_s + log Z_s); pass 2 writes g. All arithmetic
is fp32. One program per row; rows may be strided (the logits of a vocabulary-padded GEMM).
Adding the bias and 1/T here rather than in the GEMM (addmm) or in a pass of their own saves a
read and a write of both [rows x vocab] tensors; the biases (~120 KB each in fp32) stay in L2.

distil.objectives.losses imports this module only to run it, or to ask whether Triton is installed.
Tests run this kernel under Triton's interpreter (TRITON_INTERPRET=1) on the CPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without Triton (a CPU build of torch): distil.objectives.losses runs eager
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:  # (module level: a jit function finds the jit functions it calls here)

    @triton.jit
    def logits(s_row, t_row, sb_ptr, tb_ptr, inv_T, cols, inside, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr):
        """A block of both rows' (raw + bias) / T in fp32 (0 outside the row)."""
        s = tl.load(s_row + cols, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=inside, other=0.0).to(tl.float32)
        if S_BIAS:
            s += tl.load(sb_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if T_BIAS:
            t += tl.load(tb_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        return s * inv_T, t * inv_T

    @triton.jit
    def kl_rows(
        s_ptr,
        t_ptr,
        sb_ptr,
        tb_ptr,
        g_ptr,
        kl_ptr,
        coef_ptr,
        inv_T,
        s_stride,
        t_stride,
        g_stride,
        n_cols: tl.constexpr,
        BLOCK: tl.constexpr,
        WRITE_G: tl.constexpr,
        S_BIAS: tl.constexpr,
        T_BIAS: tl.constexpr,
    ):
        # n_cols (the vocabulary) is a compile-time constant: fixed for a run, and full blocks
        # then need no bounds arithmetic beyond the last one.
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = s_ptr + row * s_stride, t_ptr + row * t_stride
        m_s = tl.full((), float("-inf"), tl.float32)
        m_t = tl.full((), float("-inf"), tl.float32)
        z_s = tl.zeros((), tl.float32)
        z_t = tl.zeros((), tl.float32)
        a = tl.zeros((), tl.float32)  # sum e^(t - m_t) (t - s)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            s, t = logits(s_row, t_row, sb_ptr, tb_ptr, inv_T, cols, inside, S_BIAS, T_BIAS)
            s = tl.where(inside, s, float("-inf"))
            t = tl.where(inside, t, float("-inf"))
            new_s = tl.maximum(m_s, tl.max(s, 0))
            z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(t, 0))
            scale = tl.exp(m_t - new_t)
            e_t = tl.exp(t - new_t)
            z_t = z_t * scale + tl.sum(e_t, 0)
            a = a * scale + tl.sum(tl.where(inside, e_t * (t - s), 0.0), 0)
            m_t = new_t
        lse_s, lse_t = m_s + tl.log(z_s), m_t + tl.log(z_t)
        tl.store(kl_ptr + row, a / z_t - lse_t + lse_s)
        if WRITE_G:
            coef = tl.load(coef_ptr)
            g_row = g_ptr + row * g_stride
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < n_cols
                s, t = logits(s_row, t_row, sb_ptr, tb_ptr, inv_T, cols, inside, S_BIAS, T_BIAS)
                g = coef * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


def kl_chunk(
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor | None,
    s_bias: torch.Tensor | None = None,
    t_bias: torch.Tensor | None = None,
    inv_T: float = 1.0,
) -> torch.Tensor:
    """Sum over rows of KL(p_t || p_s), p = softmax((raw + bias) * inv_T) (an fp32 scalar tensor);
    writes coef * (p_s - p_t) into `out` ([rows x vocab], any float dtype, rows may be strided)
    when it is given. The raw logits are only read."""
    rows, n_cols = s_raw.shape
    for x in (s_raw, t_raw) + ((out,) if out is not None else ()):
        if x.stride(1) != 1:
            raise ValueError("kl_chunk: the vocabulary dimension must be contiguous")
    for b in (s_bias, t_bias):
        if b is not None and (b.shape != (n_cols,) or b.stride(0) != 1):
            raise ValueError(f"kl_chunk: a bias must be one contiguous row of {n_cols}")
    kl = torch.empty(rows, dtype=torch.float32, device=s_raw.device)
    if rows:
        g = out if out is not None else kl  # a dummy pointer when no gradient is written
        sb = s_bias if s_bias is not None else kl  # likewise when there is no bias
        tb = t_bias if t_bias is not None else kl
        kl_rows[(rows,)](
            s_raw,
            t_raw,
            sb,
            tb,
            g,
            kl,
            coef.reshape(1).float(),
            float(inv_T),
            s_raw.stride(0),
            t_raw.stride(0),
            g.stride(0),
            n_cols=n_cols,
            BLOCK=4096 if n_cols > 2048 else 1024,
            WRITE_G=out is not None,
            S_BIAS=s_bias is not None,
            T_BIAS=t_bias is not None,
            num_warps=8,
        )
    return kl.sum()
