"""Masking statistics over many batches, determinism, and word integrity per tokenizer family."""

import numpy as np
import pytest
import torch

from distil.config.sections import MaskingSection
from distil.data.batches import collate
from tests.conftest import EN_TEXT, PL_TEXT


def encode(tok, path, n=256, max_len=48):
    lines = [line for line in path.read_text().splitlines() if line.strip()][:n]
    rows = [
        [tok.cls_token_id, *ids[: max_len - 2], tok.sep_token_id]
        for ids in tok(lines, add_special_tokens=False)["input_ids"]
    ]
    return collate(rows, tok.pad_token_id, max_len)


def test_statistics_over_many_batches(wordpiece):
    from distil.data.masking import Masker

    m = Masker(MaskingSection(), wordpiece, seed=1)
    ids, attn = encode(wordpiece, EN_TEXT)
    special = m.special[ids]
    selected = n_mask = n_random = n_kept = n_eligible = 0
    for step in range(40):
        masked, labels = m(ids, attn, step)
        sel = labels != -100
        assert not (sel & (special | (attn == 0))).any(), "special or padding token chosen"
        assert torch.equal(labels[sel], ids[sel]), "labels must be the original tokens"
        assert torch.equal(masked[~sel], ids[~sel]), "only targets may change"
        n_eligible += int((attn.bool() & ~special).sum())
        selected += int(sel.sum())
        n_mask += int((masked[sel] == wordpiece.mask_token_id).sum())
        kept = masked[sel] == ids[sel]
        n_kept += int(kept.sum())
        n_random += int((~kept & (masked[sel] != wordpiece.mask_token_id)).sum())
        assert not m.special[masked[sel & (masked != wordpiece.mask_token_id)]].any(), "random tokens are never special"
    assert abs(selected / n_eligible - 0.15) < 0.003
    assert abs(n_mask / selected - 0.8) < 0.01
    # A random replacement can draw the original token (1/|V|): counted as kept here.
    assert abs(n_random / selected - 0.1) < 0.01
    assert abs(n_kept / selected - 0.1) < 0.01


def test_deterministic_in_seed_step_rank(wordpiece):
    from distil.data.masking import Masker

    ids, attn = encode(wordpiece, EN_TEXT, n=32)
    a = Masker(MaskingSection(), wordpiece, seed=3)
    b = Masker(MaskingSection(), wordpiece, seed=3)
    for args in [(5, 0, 0), (5, 1, 0), (5, 0, 1), (6, 0, 0)]:
        assert all(torch.equal(x, y) for x, y in zip(a(ids, attn, *args), b(ids, attn, *args)))
    outs = [a(ids, attn, *args)[1] for args in [(5, 0, 0), (5, 1, 0), (5, 0, 1), (6, 0, 0)]]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.equal(Masker(MaskingSection(), wordpiece, seed=4)(ids, attn, 5)[1], outs[0])


@pytest.mark.parametrize(
    "family,text,boundary",
    [
        ("wordpiece", EN_TEXT, "wordpiece"),
        ("charbpe", PL_TEXT, "charbpe"),
        ("sentencepiece", EN_TEXT, "sentencepiece"),
        ("bytebpe", EN_TEXT, "bytebpe"),
    ],
)
def test_whole_words_stay_whole(request, family, text, boundary):
    from distil.data.masking import Masker, detect_word_boundary

    tok = request.getfixturevalue(family)
    assert detect_word_boundary(tok.convert_ids_to_tokens(list(range(len(tok))))) == boundary
    m = Masker(MaskingSection(whole_word=True), tok, seed=0)
    assert m.boundary == boundary
    ids, attn = encode(tok, text, n=128)
    multi_piece_words = selected = eligible = 0
    for step in range(10):
        _, labels = m(ids, attn, step)
        sel = labels != -100
        for row in range(ids.shape[0]):
            # Words from the tokenizer's own offsets: pieces of one word touch (no whitespace between).
            toks = tok.convert_ids_to_tokens(ids[row][attn[row].bool()].tolist())
            words = _words(toks, boundary)
            for w in words:
                if len(w) > 1:
                    multi_piece_words += 1
                chosen = {bool(sel[row, i]) for i in w}
                assert len(chosen) == 1, f"word {[toks[i] for i in w]} partly masked"
        selected += int(sel.sum())
        eligible += int((attn.bool() & ~m.special[ids]).sum())
    assert multi_piece_words > 100, "fixture text must exercise multi-piece words"
    assert 0.13 < selected / eligible < 0.20  # whole words overshoot the target by at most one word


def _words(toks, boundary):
    """Independent word segmentation from the piece markers (index lists, specials excluded)."""
    words, cur = [], []
    specials = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>"}
    for i, t in enumerate(toks):
        if t in specials:
            if cur:
                words.append(cur)
            cur = []
            continue
        if boundary == "wordpiece":
            starts = not t.startswith("##")
        elif boundary == "sentencepiece":
            starts = t.startswith("▁")
        elif boundary == "bytebpe":
            starts = t.startswith("Ġ")
        else:
            starts = not cur
        if starts and cur:
            words.append(cur)
            cur = []
        cur.append(i)
        if boundary == "charbpe" and t.endswith("</w>"):
            words.append(cur)
            cur = []
    if cur:
        words.append(cur)
    return words


def test_smoothing_favours_rare_tokens(wordpiece):
    """With a small target fraction, inclusion probability is proportional to count^-0.7."""
    from distil.data.masking import Masker

    frequent, rare = 100, 101
    counts = np.ones(len(wordpiece), dtype=np.int64)
    counts[frequent], counts[rare] = 10_000, 100
    m = Masker(MaskingSection(prob=0.01, smoothing=0.7), wordpiece, seed=0, token_counts=counts)
    row = torch.tensor([frequent, rare] * 500)
    ids = torch.cat([torch.tensor([wordpiece.cls_token_id]), row, torch.tensor([wordpiece.sep_token_id])]).repeat(8, 1)
    attn = torch.ones_like(ids)
    hits = {frequent: 0, rare: 0}
    for step in range(60):
        _, labels = m(ids, attn, step)
        for t in hits:
            hits[t] += int((labels == t).sum())
    expected = (100 / 10_000) ** -0.7  # = 25.1
    ratio = hits[rare] / max(hits[frequent], 1)
    assert 0.8 * expected < ratio < 1.25 * expected, ratio
