"""What a run measures of its student while it trains: at step 0 (the untrained cut, what the
summary compares with), every train.eval_every steps and at the end (distil/train/trainer.py).

- On the held-out split, with the masks `distil eval` uses (masking.EVAL_STEP): every loss term
  of the objective, the MLM loss and accuracy (when the student has an MLM head) and the
  teacher/student agreement, each rank on its share, averaged over ranks.
- On each of eval.sources (text of another domain, never trained on): the agreement.
- The downstream probe (eval.probe), on rank 0: the teacher's scores once a run, then the
  student's, and its retention.

The embedder and the MLM scorer are distil/eval/measures.py's, as for `distil eval`.
"""

from __future__ import annotations

# Imports inside functions: the probe (scikit-learn, the optional `eval` extra) only for a run that
# names one.
import torch
import torch.distributed as dist

from distil.data.batches import collate
from distil.data.masking import EVAL_STEP
from distil.eval.measures import agreement, embed, mlm_counts


class InLoopEval:
    """`forward(model, teacher, masked, attn, labels)`: the objective's terms of one batch, named
    `terms` (and "loss")."""

    def __init__(
        self, cfg, inputs, teacher, masker, forward, terms: list[str], device: torch.device, rank: int, world: int
    ):
        self.cfg, self.inputs, self.teacher, self.masker, self.forward = cfg, inputs, teacher, masker, forward
        self.terms, self.device, self.rank, self.world = terms, device, rank, world
        self._probe_set, self._probe_teacher = None, None  # the probe's split and the teacher's scores, once made

    @torch.no_grad()
    def __call__(self, model, probe: bool = False) -> dict[str, float]:
        """The held-out figures and the agreement on eval.sources (every rank); with `probe`, the
        probe's too. `model` is put in eval mode for it and back in train mode after."""
        model.eval()
        out = self._held_out(model, self.terms) if len(self.inputs.eval) else {}
        for name, rows in self.inputs.extra_eval.items():
            n, agree = self._agreement(model, self._my_batches(rows))
            vec = torch.tensor([n, agree * n], dtype=torch.float64, device=self.device)
            dist.all_reduce(vec)
            out[f"eval_{name}/agreement"] = float(vec[1] / vec[0]) if vec[0] > 0 else float("nan")
        if probe:
            out.update(self.probe(model))
        model.train()
        return out

    def _my_batches(self, rows) -> list:
        """This rank's share of `rows` (a TokenSplit or a list of sequences), collated 32 at a time."""
        shard = list(range(self.rank, len(rows), self.world))
        take = rows.rows if hasattr(rows, "rows") else (lambda idx: [rows[i] for i in idx])
        return [
            collate(
                take(shard[i : i + 32]), self.inputs.tokenizer.pad_token_id, self.cfg.data.max_len
            )  # (as distil eval)
            for i in range(0, len(shard), 32)
        ]

    def _agreement(self, model, batches) -> tuple[int, float]:
        """(sentences, agreement) on this rank's batches; a correlation needs a few sentences."""
        n = sum(len(ids) for ids, _ in batches)
        if n < 3:
            return 0, 0.0
        to_dev = [(i.to(self.device), a.to(self.device)) for i, a in batches]
        return n, agreement(embed(self.teacher, to_dev), embed(model, to_dev))

    def _held_out(self, model, terms: list[str]) -> dict[str, float]:
        batches = self._my_batches(self.inputs.eval)
        sums, n, masked_batches = {k: 0.0 for k in [*terms, "loss"]}, 0, []  # same keys on every rank, even an idle one
        for b, (ids, attn) in enumerate(batches):
            masked, labels = self.masker(ids, attn, EVAL_STEP, b, self.rank)
            for k, v in self.forward(model, self.teacher, masked, attn, labels).items():
                sums[k] += float(v) * len(ids)
            n += len(ids)
            masked_batches.append((masked.to(self.device), attn.to(self.device), labels.to(self.device)))
        mlm = mlm_counts(model, masked_batches) if getattr(model, "has_head", False) else None
        n_agree, agree = self._agreement(model, batches)
        vec = torch.tensor(
            [n, n_agree, agree * n_agree, *(mlm or (0.0, 0, 0))] + [sums[k] for k in sorted(sums)],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(vec)
        out = {f"eval/{k}": float(v / vec[0]) for k, v in zip(sorted(sums), vec[6:].tolist())}
        out["eval/agreement"] = float(vec[2] / vec[1]) if vec[1] > 0 else float("nan")
        if mlm is not None and vec[5] > 0:
            out["eval/mlm_accuracy"] = float(vec[4] / vec[5])
        return out

    @torch.no_grad()
    def probe(self, model) -> dict[str, float]:
        """The downstream probe (cfg.eval.probe, distil/eval/probe.py) on rank 0 -- teacher once a
        run, then the student -- as `probe/...` figures; {} without one. Every rank waits for it."""
        p = self.cfg.eval.probe
        out: dict[str, float] = {}
        if p.path and self.rank == 0:
            from distil.eval.probe import evaluate_probe, load_probe

            if self._probe_set is None:
                self._probe_set = load_probe(
                    p.path,
                    p.text_column,
                    p.label_column,
                    p.group_column,
                    p.test_fraction,
                    p.max_rows,
                    self.cfg.run.seed,
                )
            r = evaluate_probe(
                self._probe_set,
                self.teacher,
                model,
                self.inputs.tokenizer,
                p.max_len,
                teacher_scores=self._probe_teacher,
            )
            self._probe_teacher = r["teacher"]
            out = {f"probe/{who}_{k}": v for who in ("teacher", "student", "retention") for k, v in r[who].items()}
            out["probe/rows"] = r["rows"]
        if self.world > 1:
            dist.barrier()
        return out
