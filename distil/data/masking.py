"""Dynamic masking, drawn anew for every batch and deterministic from (seed, step, micro, rank).

Each sequence gets prob * (eligible tokens) targets in expectation (stochastic rounding),
drawn without replacement with weights: uniform, or count^-smoothing so that rare tokens
are predicted more often (XLM / DistilBERT). Special and padding tokens are never targets.
With whole-word masking the unit drawn is a word and all its pieces are masked together;
word boundaries come from the tokenizer's piece markers. Targets become [MASK] / a random
token / themselves with probabilities mask_frac / random_frac / rest.

Everything runs on CPU tensors with an explicit generator, so the masks are the same on
any device and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from distil.config.sections import MaskingSection

IGNORE = -100
EVAL_STEP = 2**31 - 1  # the masking stream of held-out evaluation (training steps never reach it)
_MARKERS = {"wordpiece": "##", "charbpe": "</w>", "sentencepiece": "▁", "bytebpe": "Ġ"}


def detect_word_boundary(tokens: list[str]) -> str:
    """Which piece marker this vocabulary uses (the most frequent one)."""
    counts = {
        "charbpe": sum(t.endswith("</w>") for t in tokens),
        "wordpiece": sum(t.startswith("##") for t in tokens),
        "sentencepiece": sum(t.startswith("▁") for t in tokens),
        "bytebpe": sum(t.startswith("Ġ") for t in tokens),
    }
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        raise ValueError("cannot tell word boundaries from this vocabulary: set masking.word_boundary")
    return best


def generator_for(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """An independent, reproducible stream for one micro-batch of one rank."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Masker:
    def __init__(self, cfg: MaskingSection, tokenizer, seed: int, token_counts: np.ndarray | None = None):
        self.cfg, self.seed = cfg, seed
        vocab_size = len(tokenizer)
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise ValueError("the tokenizer has no mask token")
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[torch.tensor(sorted(set(tokenizer.all_special_ids)))] = True
        self.random_ids = torch.nonzero(~self.special).squeeze(1)

        weights = torch.ones(vocab_size, dtype=torch.float64)
        if cfg.smoothing is not None:
            if token_counts is None:
                raise ValueError("masking.smoothing needs token counts from the corpus")
            counts = torch.as_tensor(np.maximum(token_counts[:vocab_size], 1), dtype=torch.float64)
            weights = counts.pow(-cfg.smoothing)
        self.weights = weights.masked_fill(self.special, 0.0)

        self.boundary = None
        if cfg.whole_word:
            tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            self.boundary = detect_word_boundary(tokens) if cfg.word_boundary == "auto" else cfg.word_boundary
            marker = _MARKERS[self.boundary]
            if self.boundary == "wordpiece":
                flag = [not t.startswith(marker) for t in tokens]  # flag = starts a word
            elif self.boundary == "charbpe":
                flag = [t.endswith(marker) for t in tokens]  # flag = ends a word
            else:
                flag = [t.startswith(marker) for t in tokens]
            self.piece_flag = torch.tensor(flag, dtype=torch.bool)

    def word_starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: True where a token begins a word. Special tokens are words of their own."""
        special = self.special[input_ids]
        prev_special = torch.ones_like(special)
        prev_special[:, 1:] = special[:, :-1]
        if self.boundary is None:
            return torch.ones_like(special)
        flag = self.piece_flag[input_ids]
        if self.boundary == "charbpe":
            starts = torch.ones_like(flag)
            starts[:, 1:] = flag[:, :-1]  # a word starts after a piece that ends one
        else:
            starts = flag
        return starts | special | prev_special

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int, micro: int = 0, rank: int = 0):
        """Returns (masked input ids, labels with IGNORE where no prediction is asked)."""
        g = generator_for(self.seed, step, micro, rank)
        b, n = input_ids.shape
        eligible = attention_mask.bool() & ~self.special[input_ids]
        pos = torch.arange(n).expand(b, n)
        # Index of the first piece of each token's word (the token itself without whole-word masking).
        first = torch.cummax(torch.where(self.word_starts(input_ids), pos, 0), dim=1).values

        # Weighted sampling without replacement (Efraimidis-Spirakis): key = log(u) / w, largest first.
        u = torch.rand(b, n, generator=g, dtype=torch.float64).clamp_min_(1e-300)
        w = self.weights[input_ids]
        key = torch.where(eligible & (w > 0), u.log() / w, torch.tensor(-torch.inf, dtype=torch.float64))
        key = key.gather(1, first)  # one key per word: its pieces sort together, in position order
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        taken_before = torch.cumsum(eligible.gather(1, order).long(), dim=1)
        taken_before = taken_before - eligible.gather(1, order).long()
        before = torch.empty_like(taken_before).scatter_(1, order, taken_before)

        n_eligible = eligible.sum(1).to(torch.float64)
        target = torch.floor(n_eligible * self.cfg.prob + torch.rand(b, generator=g, dtype=torch.float64))
        selected = eligible & (before.gather(1, first) < target[:, None])

        action = torch.rand(b, n, generator=g)
        to_mask = selected & (action < self.cfg.mask_frac)
        to_random = selected & (action >= self.cfg.mask_frac) & (action < self.cfg.mask_frac + self.cfg.random_frac)
        random_tokens = self.random_ids[torch.randint(len(self.random_ids), (b, n), generator=g)]

        masked = torch.where(to_mask, torch.tensor(self.mask_id), input_ids)
        masked = torch.where(to_random, random_tokens, masked)
        labels = torch.where(selected, input_ids, torch.tensor(IGNORE))
        return masked, labels
