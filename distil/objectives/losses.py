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
  relation           MiniLMv2's query/key/value relations, the student's last layer against a teacher
                     layer (distil/objectives/relations.py)
  attention          TinyBERT's attention-score MSE, each student layer against its teacher layer,
                     averaged over layers
  sentence_mse       MSE of the mean-pooled last hidden states (sentence embeddings; distil/objectives/sentence.py)
  similarity         MSE of the in-batch cosine-similarity matrices of those embeddings
  similarity_corr    1 - the Pearson correlation of those matrices' off-diagonal entries

A narrower student's hidden states go through its learned projection (MaskedLM.projection)
before the hidden-state terms compare them with the teacher's.

Which positions: recipe 'distilbert' reads every non-pad token for kl/cos/mse and masked tokens
for mlm; recipe 'masked' reads masked tokens only for every term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.config.sections import LossSection
from distil.data.masking import IGNORE
from distil.model.student import HeadOutput
from distil.objectives.fused_head import Rows, fused_head_loss
from distil.objectives.relations import attention_score_mse, relation_kl
from distil.objectives.sentence import mean_pool, sentence_mse, similarity_corr, similarity_mse


def kl_with_temperature(
    s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float, chunk: int = 4096
) -> torch.Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)) * T^2, in row chunks so that no
    [rows x vocab] fp32 temporaries beyond one chunk are alive at once."""
    n = s_logits.shape[0]
    total = s_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        s = F.log_softmax(s_logits[i : i + chunk].float() / temperature, dim=-1)
        t = F.log_softmax(t_logits[i : i + chunk].float() / temperature, dim=-1)
        total = total + F.kl_div(s, t, log_target=True, reduction="sum")
    return total / max(n, 1) * temperature**2


# Means are written as sum / max(count, 1) so that a batch with no masked position gives 0, not NaN.
def _cos(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)).sum() / max(s.shape[0], 1)


def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s.float(), t.float(), reduction="sum") / max(s.numel(), 1)


class DistillationLoss:
    def __init__(
        self,
        cfg: LossSection,
        student_layers: list[int],
        teacher_layers: int | None = None,
        heads: tuple[int, int] | None = None,
    ):
        """`teacher_layers`: the teacher's layer count (its last is the default relation layer);
        `heads`: (student, teacher) attention heads, for the attention-score term."""
        self.cfg = cfg
        # Student hidden_states[i + 1] is the output of its layer i, a copy of teacher layer
        # student_layers[i] (teacher hidden_states[student_layers[i] + 1]); the last one is `cos`.
        self.intermediate = [(i + 1, j + 1) for i, j in enumerate(student_layers[:-1])]
        self.attention_pairs = list(enumerate(student_layers))  # (student layer, teacher layer)
        last = cfg.relation_teacher_layer if cfg.relation_teacher_layer is not None else (teacher_layers or 0) - 1
        self.relation_pair = (len(student_layers) - 1, last)
        self.heads = heads

    def weights(self) -> dict[str, float]:
        c = self.cfg
        w = {
            "kl": c.alpha_kl,
            "mlm": c.alpha_mlm,
            "cos": c.alpha_cos,
            "mse": c.alpha_mse,
            "mse_hidden": c.alpha_mse_hidden,
            "cos_intermediate": c.alpha_cos_intermediate,
            "relation": c.alpha_relation,
            "attention": c.alpha_attention,
            "sentence_mse": c.alpha_sentence_mse,
            "similarity": c.alpha_similarity,
            "similarity_corr": c.alpha_similarity_corr,
        }
        return {k: v for k, v in w.items() if v > 0}

    def qkv_layers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(student layers, teacher layers) whose query/key/value projections the terms read."""
        s, t = set(), set()
        if self.cfg.alpha_relation:
            s.add(self.relation_pair[0]), t.add(self.relation_pair[1])
        if self.cfg.alpha_attention:
            s.update(i for i, _ in self.attention_pairs), t.update(j for _, j in self.attention_pairs)
        return tuple(sorted(s)), tuple(sorted(t))

    def __call__(
        self,
        s_hidden,
        t_hidden,
        s_logits,
        t_logits,
        positions: torch.Tensor,
        labels: torch.Tensor,
        rows: Rows | None = None,
        project=None,
        s_qkv: dict | None = None,
        t_qkv: dict | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """s/t_hidden: tuples of [B, L, H]; s/t_logits: [len(positions), V] or None; labels: [B, L].
        rows: `positions` and what follows from them, found on the host (see Rows). project: the
        narrower student's projection into the teacher's width (None: same width). s/t_qkv:
        {layer: (queries, keys, values)} of the layers `qkv_layers` names, with the batch's
        attention_mask. Returns every active term (unweighted) and 'loss', their weighted sum."""
        w = self.weights()

        def at(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, x.shape[-1]).index_select(0, positions)

        def student_at(x: torch.Tensor) -> torch.Tensor:
            return at(x) if project is None else project(at(x))

        terms: dict[str, torch.Tensor] = {}
        head_loss = None
        if isinstance(s_logits, HeadOutput):
            if isinstance(t_logits, HeadOutput):  # the fast path: logits a chunk at a time
                targets = rows.targets if rows is not None else labels.reshape(-1).index_select(0, positions)
                head_loss, head_terms = fused_head_loss(
                    s_logits,
                    t_logits,
                    targets,
                    self.cfg.temperature,
                    w.get("kl", 0.0),
                    w.get("mlm", 0.0),
                    w.get("mse", 0.0),
                    rows=rows,
                )
                terms.update(head_terms)
            else:
                s_logits = s_logits.logits()
        elif isinstance(t_logits, HeadOutput):
            t_logits = t_logits.logits()
        if "kl" in w and head_loss is None:
            terms["kl"] = kl_with_temperature(s_logits, t_logits, self.cfg.temperature)
        if "mlm" in w and head_loss is None:
            targets = labels.reshape(-1).index_select(0, positions)
            n_masked = (targets != IGNORE).sum().clamp_min(1)
            terms["mlm"] = F.cross_entropy(s_logits.float(), targets, ignore_index=IGNORE, reduction="sum") / n_masked
        if "mse" in w and head_loss is None:
            terms["mse"] = _mse(s_logits, t_logits)
        if "cos" in w or "mse_hidden" in w:
            s_last, t_last = student_at(s_hidden[-1]), at(t_hidden[-1])
            if "cos" in w:
                terms["cos"] = _cos(s_last, t_last)
            if "mse_hidden" in w:
                terms["mse_hidden"] = _mse(s_last, t_last)
        if "cos_intermediate" in w:
            pairs = [_cos(student_at(s_hidden[i]), at(t_hidden[j])) for i, j in self.intermediate]
            terms["cos_intermediate"] = torch.stack(pairs).mean() if pairs else s_hidden[-1].new_zeros(())
        if {"sentence_mse", "similarity", "similarity_corr"} & w.keys():  # every non-pad token, whatever the recipe
            s_emb, t_emb = mean_pool(s_hidden[-1], attention_mask), mean_pool(t_hidden[-1], attention_mask)
            if "sentence_mse" in w:
                terms["sentence_mse"] = sentence_mse(s_emb if project is None else project(s_emb), t_emb)
            if "similarity" in w:
                terms["similarity"] = similarity_mse(s_emb, t_emb)
            if "similarity_corr" in w:
                terms["similarity_corr"] = similarity_corr(s_emb, t_emb)
        if "relation" in w:
            i, j = self.relation_pair
            terms["relation"] = relation_kl(s_qkv[i], t_qkv[j], attention_mask, self.cfg.relation_heads)
        if "attention" in w:
            s_heads, t_heads = self.heads
            terms["attention"] = torch.stack(
                [
                    attention_score_mse(s_qkv[i][0], s_qkv[i][1], t_qkv[j][0], t_qkv[j][1], attention_mask, s_heads)
                    for i, j in self.attention_pairs
                ]
            ).mean()
        fused = {"kl", "mlm", "mse"} if head_loss is not None else set()
        terms["loss"] = sum((w[k] * terms[k] for k in w if k not in fused), head_loss if head_loss is not None else 0.0)
        return terms


def distillation_forward(
    model, teacher, loss: DistillationLoss, masked, attn, labels, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Teacher forward (no grad) and student forward, then the loss terms. Only the positions a
    loss reads go through the LM heads, and their logits are made a chunk at a time inside the
    loss (HeadOutput), never as one [positions x vocab] tensor.

    The batch comes from the host: which rows the terms read is worked out there (Rows), and the
    batch is then sent to `device` (pinned, asynchronous on a GPU): the step has no device sync."""
    device = device or masked.device
    rows = Rows.of(loss.cfg.recipe, attn, labels).to(device)
    if device.type == "cuda":
        masked, attn, labels = (t.pin_memory().to(device, non_blocking=True) for t in (masked, attn, labels))
    else:
        masked, attn, labels = (t.to(device) for t in (masked, attn, labels))
    logit_positions = rows.positions if loss.cfg.needs_logits else None
    s_layers, t_layers = loss.qkv_layers()
    with torch.no_grad():
        t_hidden, t_logits, *t_qkv = teacher(masked, attn, logit_positions, lazy_logits=True, qkv_layers=t_layers)
    s_hidden, s_logits, *s_qkv = model(masked, attn, logit_positions, lazy_logits=True, qkv_layers=s_layers)
    project = getattr(model, "module", model).projection  # (model may be the DeepSpeed engine around a MaskedLM)
    return loss(
        s_hidden,
        t_hidden,
        s_logits,
        t_logits,
        rows.positions,
        labels,
        rows=rows,
        project=project,
        s_qkv=s_qkv[0] if s_qkv else None,
        t_qkv=t_qkv[0] if t_qkv else None,
        attention_mask=attn,
    )
