"""Sentence embeddings and the loss terms on them, as sentence-transformers distils a model.

A sentence embedding is the mean of a layer's hidden states over the non-pad tokens (what
`agreement` and the downstream probe read too). Two terms compare the student's with the
teacher's, batch by batch:

- `sentence_mse`: the mean squared difference of the embeddings themselves (sentence-
  transformers' MSE distillation, Reimers & Gurevych 2020), in the teacher's width (a narrower
  student's through its projection);
- `similarity_mse`: the mean squared difference of the two models' in-batch cosine-similarity
  matrices, i.e. how each model relates the batch's sentences to each other -- what the
  held-out agreement measures, for any widths;
- `similarity_corr`: one minus the Pearson correlation of the two matrices' off-diagonal entries:
  the same relations up to an offset and a scale, closer to the Spearman correlation that
  `agreement` reports (a rank correlation has no useful gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def sentence_mse(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s_emb.float(), t_emb.float())


def similarity_mse(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    s, t = F.normalize(s_emb.float(), dim=-1), F.normalize(t_emb.float(), dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def pairwise_cosines(emb: torch.Tensor) -> torch.Tensor:
    """Upper triangle (i < j) of the cosine-similarity matrix, flattened, in emb's dtype."""
    e = F.normalize(emb, dim=-1)
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    return (e @ e.T)[i, j]


def similarity_corr(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """1 - Pearson r of the in-batch cosine similarities (each pair once); 0 for a batch of one."""
    if s_emb.shape[0] < 3:  # fewer than two pairs: no correlation to speak of
        return s_emb.new_zeros((), dtype=torch.float32)
    a, b = pairwise_cosines(s_emb.float()), pairwise_cosines(t_emb.float())
    a, b = a - a.mean(), b - b.mean()
    return 1.0 - (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
