"""Loss terms on the inside of attention, for students of any shape.

- `relation_kl`: MiniLMv2's self-attention relation distillation (Wang et al. 2021). The
  queries of a layer, [B, L, H], are split into R relation heads of H / R dimensions
  (whatever the model's own head count), and each head's relation is softmax(x x^T / sqrt(H / R))
  over the non-pad keys: an L x L distribution per query position. The student's relations
  learn the teacher's by KL(teacher || student), averaged over relation heads and non-pad query
  positions; the same for keys and values, and the three are summed (the paper's L_QQ + L_KK
  + L_VV). Relations are L x L whatever the widths, so a 384-wide student with 12 heads learns
  from a 768- or 1024-wide teacher with 12 or 16.
- `attention_score_mse`: TinyBERT's attention transfer (Jiao et al. 2020): the MSE between
  the student's and the teacher's attention scores Q K^T / sqrt(d), head by head, over the
  pairs of non-pad positions; it needs the same number of heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H] -> [B, heads, L, H / heads]."""
    b, n, h = x.shape
    return x.reshape(b, n, heads, h // heads).transpose(1, 2)


def _log_relations(x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(x_r x_r^T / sqrt(d_r)) over the valid keys: [B, heads, L, L], in fp32."""
    xr = _heads(x.float(), heads)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(xr.shape[-1])
    return F.log_softmax(scores.masked_fill(~keys[:, None, None, :], float("-inf")), dim=-1)


def relation_kl(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Sum over the pairs (queries, keys, values) of the mean KL(teacher || student) of their
    relations over `heads` relation heads and the non-pad query positions."""
    valid = attention_mask.bool()
    rows = valid[:, None, :].expand(-1, heads, -1)  # [B, heads, L]: the query positions that count
    total = torch.zeros((), device=valid.device)
    for s, t in zip(student, teacher):
        log_s, log_t = _log_relations(s, valid, heads), _log_relations(t, valid, heads)
        # padded keys: p_t = 0 there, and 0 * (-inf - -inf) must count as 0
        kl = torch.where(valid[:, None, None, :], log_t.exp() * (log_t - log_s), 0.0).sum(-1)
        total = total + kl[rows].sum() / max(int(rows.sum()), 1)
    return total


def attention_scores(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Q K^T / sqrt(d) per head: [B, heads, L, L], in fp32."""
    qh, kh = _heads(q.float(), heads), _heads(k.float(), heads)
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])


def attention_score_mse(
    s_q: torch.Tensor, s_k: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor, attention_mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """The mean squared difference of the attention scores over heads and pairs of non-pad positions."""
    valid = attention_mask.bool()
    pairs = (valid[:, :, None] & valid[:, None, :])[:, None].expand(-1, heads, -1, -1)
    d = attention_scores(s_q, s_k, heads) - attention_scores(t_q, t_k, heads)
    return d[pairs].pow(2).sum() / max(int(pairs.sum()), 1)
