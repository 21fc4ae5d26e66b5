"""The distillation objective: a weighted sum of named terms, each one returned for logging.

Terms (each averaged over the positions it reads):
  kl      KL(p_teacher || p_student) of softmax(logits / T), times T^2 (Hinton et al.;
          DistilBERT's KLDivLoss(batchmean) over positions)
  mlm     cross-entropy of the student's logits against the original tokens at masked positions
  cos     1 - cos(student, teacher) on last hidden states (DistilBERT's CosineEmbeddingLoss, y=1)
  mse     mean squared error between student and teacher logits
  mse_hidden         mean squared error between last hidden states
  cos_intermediate   the cos term on each intermediate student layer and the teacher layer it was
                     copied from, averaged over layers

Which positions: recipe 'distilbert' reads every non-pad token for kl/cos/mse and masked tokens
for mlm; recipe 'masked' reads masked tokens only for every term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.config import LossSection
from distil.masking import IGNORE


def loss_positions(recipe: str, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*L) of the positions the distillation terms read."""
    keep = labels.reshape(-1) != IGNORE if recipe == "masked" else attention_mask.reshape(-1).bool()
    return torch.nonzero(keep).squeeze(1)


def kl_with_temperature(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float, chunk: int = 4096) -> torch.Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)) * T^2, in row chunks so that no
    [rows x vocab] fp32 temporaries beyond one chunk are alive at once."""
    n = s_logits.shape[0]
    total = s_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        s = F.log_softmax(s_logits[i:i + chunk].float() / temperature, dim=-1)
        t = F.log_softmax(t_logits[i:i + chunk].float() / temperature, dim=-1)
        total = total + F.kl_div(s, t, log_target=True, reduction="sum")
    return total / max(n, 1) * temperature**2


# Means are written as sum / max(count, 1) so that a batch with no masked position gives 0, not NaN.
def _cos(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)).sum() / max(s.shape[0], 1)


def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s.float(), t.float(), reduction="sum") / max(s.numel(), 1)


class DistillationLoss:
    def __init__(self, cfg: LossSection, student_layers: list[int]):
        self.cfg = cfg
        # Student hidden_states[i + 1] is the output of its layer i, a copy of teacher layer
        # student_layers[i] (teacher hidden_states[student_layers[i] + 1]); the last one is `cos`.
        self.intermediate = [(i + 1, j + 1) for i, j in enumerate(student_layers[:-1])]

    def weights(self) -> dict[str, float]:
        c = self.cfg
        w = {"kl": c.alpha_kl, "mlm": c.alpha_mlm, "cos": c.alpha_cos, "mse": c.alpha_mse,
             "mse_hidden": c.alpha_mse_hidden, "cos_intermediate": c.alpha_cos_intermediate}
        return {k: v for k, v in w.items() if v > 0}

    def __call__(self, s_hidden, t_hidden, s_logits, t_logits, positions: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """s/t_hidden: tuples of [B, L, H]; s/t_logits: [len(positions), V] or None; labels: [B, L].
        Returns every active term (unweighted) and 'loss', their weighted sum."""
        w = self.weights()
        h = s_hidden[-1].shape[-1]

        def at(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, h).index_select(0, positions)

        terms: dict[str, torch.Tensor] = {}
        if "kl" in w:
            terms["kl"] = kl_with_temperature(s_logits, t_logits, self.cfg.temperature)
        if "mlm" in w:
            targets = labels.reshape(-1).index_select(0, positions)
            n_masked = (targets != IGNORE).sum().clamp_min(1)
            terms["mlm"] = F.cross_entropy(s_logits.float(), targets, ignore_index=IGNORE, reduction="sum") / n_masked
        if "mse" in w:
            terms["mse"] = _mse(s_logits, t_logits)
        if "cos" in w or "mse_hidden" in w:
            s_last, t_last = at(s_hidden[-1]), at(t_hidden[-1])
            if "cos" in w:
                terms["cos"] = _cos(s_last, t_last)
            if "mse_hidden" in w:
                terms["mse_hidden"] = _mse(s_last, t_last)
        if "cos_intermediate" in w:
            pairs = [_cos(at(s_hidden[i]), at(t_hidden[j])) for i, j in self.intermediate]
            terms["cos_intermediate"] = torch.stack(pairs).mean() if pairs else s_hidden[-1].new_zeros(())
        terms["loss"] = sum(w[k] * terms[k] for k in w)
        return terms
