"""Held-out measures: teacher/student agreement of sentence embeddings.

Agreement = Spearman correlation between the teacher's and the student's pairwise cosine
similarities of mean-pooled last hidden states over the same sentences. 1.0 means the
student ranks every pair of sentences as the teacher does.
"""

from __future__ import annotations

import torch

from distil.sentence import mean_pool, pairwise_cosines


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (as scipy.stats.rankdata)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled last hidden states; `model` is a distil.model.MaskedLM (or DeepSpeed engine around one)."""
    out = []
    for ids, mask in batches:
        hidden, _ = model(ids, mask)
        out.append(mean_pool(hidden[-1].float(), mask).cpu())
    return torch.cat(out)


def agreement(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> float:
    return spearman(pairwise_cosines(teacher_emb.double()), pairwise_cosines(student_emb.double()))
