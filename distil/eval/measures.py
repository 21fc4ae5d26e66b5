"""The measures of a model, the same wherever they are taken -- in the loop (distil/eval/in_loop.py),
by `distil eval` (distil/eval/compare.py) and for the probe (distil/eval/probe.py): one
embedder and one MLM scorer.

- Sentence embeddings: mean-pooled last hidden states, in fp32 (`embed`).
- Agreement: the Spearman correlation between the teacher's and the student's pairwise cosine
  similarities of those embeddings over the same sentences. 1.0 means the student ranks every
  pair of sentences as the teacher does.
- MLM loss and accuracy: the cross-entropy and top-1 accuracy at the masked positions
  (`mlm_counts`: sums, so that ranks can add theirs before dividing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.data.masking import IGNORE
from distil.objectives.sentence import mean_pool, pairwise_cosines


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
    """Mean-pooled last hidden states; `model` is a distil.model.student.MaskedLM (or DeepSpeed engine around one)."""
    out = []
    for ids, mask in batches:
        hidden, _ = model(ids, mask)
        out.append(mean_pool(hidden[-1].float(), mask).cpu())
    return torch.cat(out)


def agreement(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> float:
    return spearman(pairwise_cosines(teacher_emb.double()), pairwise_cosines(student_emb.double()))


@torch.no_grad()
def mlm_counts(model, batches) -> tuple[float, int, int] | None:
    """(summed cross-entropy, correct top-1 predictions, masked tokens) of `model` (a MaskedLM
    with an MLM head) over (masked ids, attention mask, labels) batches; None without a head."""
    if not model.has_head:
        return None
    loss, correct, n = 0.0, 0, 0
    for masked, attn, labels in batches:
        flat = labels.reshape(-1)
        positions = torch.nonzero(flat != IGNORE).squeeze(1)
        _, logits = model(masked, attn, positions)
        target = flat[positions]
        loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        n += len(positions)
    return loss, correct, n
