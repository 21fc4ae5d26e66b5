"""Each loss term against an independent computation written with torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from distil.config.sections import LossSection
from distil.objectives.fused_head import loss_positions
from distil.objectives.losses import DistillationLoss, kl_with_temperature

B, L, H, V = 3, 7, 8, 11


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, 5:] = 0
    attn[2, 3:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[1, 2], labels[1, 6], labels[2, 1] = 3, 4, 5, 6
    s_hidden = tuple(torch.randn(B, L, H, generator=g, dtype=torch.float64) for _ in range(3))
    t_hidden = tuple(torch.randn(B, L, H, generator=g, dtype=torch.float64) for _ in range(5))
    s_full = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    t_full = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    return attn, labels, s_hidden, t_hidden, s_full, t_full


def reference(recipe, attn, labels, s_hidden, t_hidden, s_full, t_full, T, layers):
    """The DistilBERT formulation: masked_select, separate softmax/log_softmax, batchmean KL."""
    sel = (labels != -100) if recipe == "masked" else attn.bool()
    s = s_full[sel].view(-1, V)
    t = t_full[sel].view(-1, V)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    mlm = F.cross_entropy(s_full.view(-1, V), labels.view(-1), ignore_index=-100)
    hs, ht = s_hidden[-1][sel], t_hidden[-1][sel]
    cos = F.cosine_embedding_loss(hs, ht, torch.ones(len(hs), dtype=torch.float64))
    mse = F.mse_loss(s, t)
    mse_h = F.mse_loss(hs, ht)
    inter = torch.stack(
        [
            F.cosine_embedding_loss(
                s_hidden[i + 1][sel], t_hidden[j + 1][sel], torch.ones(len(hs), dtype=torch.float64)
            )
            for i, j in enumerate(layers[:-1])
        ]
    ).mean()
    return {"kl": kl, "mlm": mlm, "cos": cos, "mse": mse, "mse_hidden": mse_h, "cos_intermediate": inter}


@pytest.mark.parametrize("recipe", ["distilbert", "masked"])
def test_every_term_matches_the_reference(batch, recipe):
    attn, labels, s_hidden, t_hidden, s_full, t_full = batch
    cfg = LossSection(
        recipe=recipe,
        temperature=2.0,
        alpha_kl=5.0,
        alpha_mlm=2.0,
        alpha_cos=1.0,
        alpha_mse=0.5,
        alpha_mse_hidden=0.25,
        alpha_cos_intermediate=0.125,
    )
    layers = [0, 3]
    pos = loss_positions(recipe, attn, labels)
    s_logits = s_full.reshape(-1, V)[pos]
    t_logits = t_full.reshape(-1, V)[pos]
    got = DistillationLoss(cfg, layers)(s_hidden, t_hidden, s_logits, t_logits, pos, labels)
    ref = reference(recipe, attn, labels, s_hidden, t_hidden, s_full, t_full, 2.0, layers)
    for k, v in ref.items():
        assert abs(float(got[k]) - float(v)) <= 1e-6, (k, float(got[k]), float(v))
    total = (
        5 * ref["kl"]
        + 2 * ref["mlm"]
        + ref["cos"]
        + 0.5 * ref["mse"]
        + 0.25 * ref["mse_hidden"]
        + 0.125 * ref["cos_intermediate"]
    )
    assert abs(float(got["loss"]) - float(total)) <= 1e-6 * abs(float(total))  # fp32 sum of six terms


def test_positions_per_recipe(batch):
    attn, labels = batch[0], batch[1]
    assert loss_positions("distilbert", attn, labels).tolist() == torch.nonzero(attn.reshape(-1)).squeeze(1).tolist()
    assert loss_positions("masked", attn, labels).tolist() == [1, 9, 13, 15]


def test_inactive_terms_are_not_computed(batch):
    attn, labels, s_hidden, t_hidden, *_ = batch
    cfg = LossSection(alpha_kl=0, alpha_mlm=0, alpha_cos=1.0)
    got = DistillationLoss(cfg, [0, 1])(
        s_hidden, t_hidden, None, None, loss_positions("distilbert", attn, labels), labels
    )
    assert set(got) == {"cos", "loss"} and torch.equal(got["loss"], got["cos"])


def test_chunked_kl_equals_whole(batch):
    s, t = batch[4].reshape(-1, V), batch[5].reshape(-1, V)
    assert torch.allclose(
        kl_with_temperature(s, t, 3.0, chunk=4), kl_with_temperature(s, t, 3.0, chunk=10**6), atol=1e-6, rtol=0
    )


def test_no_masked_position_gives_zero_not_nan(batch):
    attn, _, s_hidden, t_hidden, s_full, t_full = batch
    labels = torch.full((B, L), -100)
    cfg = LossSection(recipe="masked", alpha_mse=1.0)
    pos = loss_positions("masked", attn, labels)
    got = DistillationLoss(cfg, [0, 1])(
        s_hidden, t_hidden, s_full.reshape(-1, V)[pos], t_full.reshape(-1, V)[pos], pos, labels
    )
    assert all(float(v) == 0.0 for v in got.values())


def test_kl_gradient_matches_reference(batch):
    s = batch[4].reshape(-1, V).clone().requires_grad_()
    t = batch[5].reshape(-1, V)
    kl_with_temperature(s, t, 2.0, chunk=5).backward()
    s2 = s.detach().clone().requires_grad_()
    (F.kl_div(F.log_softmax(s2 / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6, rtol=0)  # computed in fp32


@pytest.mark.parametrize("recipe", ["distilbert", "masked"])
def test_fused_head_loss_equals_reference_values_and_gradients(batch, recipe):
    """Logits made a chunk at a time from the head's features: the same loss and the same
    gradients (features, decoder weight and bias) as full logits and the reference formulation."""
    from distil.model.student import HeadOutput

    attn, labels, s_hidden, t_hidden, *_ = batch
    g = torch.Generator().manual_seed(1)
    hf = 6
    s_feat = torch.randn(B * L, hf, generator=g, dtype=torch.float64)
    t_feat = torch.randn(B * L, hf, generator=g, dtype=torch.float64)
    s_w, s_b = torch.randn(V, hf, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    t_w, t_b = torch.randn(V, hf, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    cfg = LossSection(recipe=recipe, temperature=2.0, alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.5)
    pos = loss_positions(recipe, attn, labels)

    def leaves():
        return [x.detach().clone().requires_grad_() for x in (s_feat, s_w, s_b)]

    fused_in = leaves()
    s_head = HeadOutput(fused_in[0][pos], fused_in[1], fused_in[2])
    t_head = HeadOutput(t_feat[pos], t_w, t_b)
    import distil.objectives.losses as losses

    got = losses.DistillationLoss(cfg, [0, 3])(s_hidden, t_hidden, s_head, t_head, pos, labels)
    got["loss"].backward()

    ref_in = leaves()
    s_full = (ref_in[0] @ ref_in[1].T + ref_in[2]).view(B, L, V)
    t_full = (t_feat @ t_w.T + t_b).view(B, L, V)
    ref = reference(recipe, attn, labels, s_hidden, t_hidden, s_full, t_full, 2.0, [0, 3])
    total = 5 * ref["kl"] + 2 * ref["mlm"] + ref["cos"] + 0.5 * ref["mse"]
    total.backward()
    for k in ("kl", "mlm", "mse", "cos"):  # the head terms are computed in fp32
        g, r = float(got[k]), float(ref[k].detach())
        assert abs(g - r) <= 1e-6 * max(1.0, abs(r)), k
    t = float(total.detach())
    assert abs(float(got["loss"].detach()) - t) <= 1e-6 * abs(t)
    for a, b in zip(fused_in, ref_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-6), (a.grad - b.grad).abs().max()


def test_fused_head_loss_chunks_agree():
    """Chunk size changes nothing but the rounding order (fp32)."""
    from distil.model.student import HeadOutput
    from distil.objectives.fused_head import fused_head_loss

    g = torch.Generator().manual_seed(2)
    n, hf, v = 50, 16, 300
    feats = torch.randn(n, hf, generator=g)
    w, b = torch.randn(v, hf, generator=g) * 0.1, torch.zeros(v)
    t = HeadOutput(torch.randn(n, hf, generator=g), torch.randn(v, hf, generator=g) * 0.1, torch.zeros(v))
    targets = torch.full((n,), -100)
    targets[::3] = torch.randint(0, v, (len(targets[::3]),), generator=g)
    out = []
    for chunk in (7, 64):
        x = feats.clone().requires_grad_()
        loss, terms = fused_head_loss(HeadOutput(x, w, b), t, targets, 3.0, 5.0, 2.0, 0.0, chunk=chunk)
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5, rtol=0) and torch.allclose(
        out[0][1], out[1][1], atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("recipe", ["distilbert", "masked"])
def test_rows_found_on_the_host(recipe):
    """The training path finds the loss rows on the host (no device sync in the step): the same
    rows, targets and masked rows as on the device, and the same loss, chunk by chunk."""
    from distil.model.student import HeadOutput
    from distil.objectives.fused_head import Rows, fused_head_loss

    g = torch.Generator().manual_seed(3)
    attn = torch.ones(4, 12, dtype=torch.long)
    attn[1, 7:] = 0
    labels = torch.full((4, 12), -100)
    chosen = torch.rand(4, 12, generator=g) < 0.3
    labels[chosen] = torch.randint(0, 50, (int(chosen.sum()),), generator=g)
    labels[attn == 0] = -100
    rows = Rows.of(recipe, attn, labels)
    pos = loss_positions(recipe, attn, labels)
    targets = labels.reshape(-1)[pos]
    assert torch.equal(rows.positions, pos) and torch.equal(rows.targets, targets)
    assert rows.mlm_rows.tolist() == [i for i, t in enumerate(targets.tolist()) if t != -100]
    assert rows.n_masked == int((labels != -100).sum()) > 0
    n, hf, v = len(pos), 8, 50
    feats = torch.randn(n, hf, generator=g)
    w, b = torch.randn(v, hf, generator=g), torch.randn(v, generator=g)
    t = HeadOutput(torch.randn(n, hf, generator=g), torch.randn(v, hf, generator=g), torch.randn(v, generator=g))
    out = []
    for given in (rows, None):
        x = feats.clone().requires_grad_()
        loss, terms = fused_head_loss(HeadOutput(x, w, b), t, targets, 2.0, 5.0, 2.0, 0.5, chunk=5, rows=given)
        loss.backward()
        out.append((loss.detach(), terms["mlm"], x.grad))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    ce = F.cross_entropy(feats[rows.mlm_rows] @ w.T + b, targets[rows.mlm_rows])
    assert torch.allclose(out[0][1], ce, rtol=1e-5)


def _head_case(seed: int, n: int = 40, hf: int = 8, v: int = 300, dtype=torch.float32):
    from distil.model.student import HeadOutput

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, hf, generator=g, dtype=dtype)
    w, b = torch.randn(v, hf, generator=g, dtype=dtype), torch.randn(v, generator=g, dtype=dtype)
    t = HeadOutput(
        torch.randn(n, hf, generator=g, dtype=dtype),
        torch.randn(v, hf, generator=g, dtype=dtype),
        torch.randn(v, generator=g, dtype=dtype),
    )
    targets = torch.full((n,), -100)
    targets[::4] = torch.randint(0, v, (len(targets[::4]),), generator=g)
    return feats, w, b, t, targets


def _fused_run(case, **kw):
    from distil.model.student import HeadOutput
    from distil.objectives.fused_head import fused_head_loss

    feats, w, b, t, targets = case
    leaves = [x.clone().requires_grad_() for x in (feats, w, b)]
    loss, terms = fused_head_loss(HeadOutput(*leaves), t, targets, 2.0, 5.0, 2.0, 0.5, chunk=7, **kw)
    loss.backward()
    return [loss.detach(), *(terms[k] for k in ("kl", "mlm", "mse"))], [x.grad for x in leaves]


def test_vocabulary_padding_changes_nothing(monkeypatch):
    """On a GPU the decoder is padded to a multiple of 64 rows for aligned GEMMs: the loss and
    the gradients of features, weight and bias are those of the unpadded head (300 -> 320)."""
    import distil.objectives.fused_head as fused_head

    case = _head_case(4, dtype=torch.float64)
    want = _fused_run(case)
    monkeypatch.setattr(fused_head, "vocab_multiple", lambda device: 64)
    got = _fused_run(case)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def triton_results():
    """The fused Triton kernel run by Triton's interpreter on the CPU (CI has no GPU), in its own
    process: TRITON_INTERPRET must be set before Triton is first imported."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kl_kernel_check.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("v", [300, 5000])  # one block; several blocks with a ragged last one
def test_triton_kl_kernel_matches_fp64(triton_results, dtype, v):
    """KL sum and gradient coef * (p_s - p_t) of softmax((raw + bias) / T) against fp64, on strided
    rows (the padded GEMM's output), with the padding columns and the raw logits left untouched."""
    r = triton_results["kernel"][f"{dtype}-{v}"]
    assert abs(r["kl"] - r["ref_kl"]) <= 1e-5 * r["ref_kl"]
    assert abs(r["kl_no_bias"] - r["ref_kl_no_bias"]) <= 1e-5 * r["ref_kl_no_bias"]
    assert r["inputs_untouched"]
    # Within one rounding of g's dtype (|g| <= coef); in fp32, the exp of ~10-sized arguments.
    eps = {"float32": 0.0, "float16": torch.finfo(torch.float16).eps, "bfloat16": torch.finfo(torch.bfloat16).eps}[
        dtype
    ]
    assert r["g_err"] <= max(1e-6, 0.37 * eps)
    assert r["padding_untouched"]
    assert r["kl_without_grad"] == r["kl"]


def test_fused_head_loss_with_triton_kernel_equals_eager(triton_results):
    """The whole fused loss with the Triton kernel and the GPU's vocabulary padding: the same
    loss terms and gradients as the eager path, fp32."""
    r = triton_results["fused"]
    assert r["n"] == 7 and r["max_rel_err"] <= 1e-6, r  # loss, 3 terms, 3 gradients


def test_unknown_kl_kernel_is_refused():
    from distil.objectives.fused_head import set_kl_kernel

    with pytest.raises(ValueError, match="unknown KL kernel 'cuda'"):
        set_kl_kernel("cuda")


@pytest.mark.parametrize(
    "kernel,dtype", [("eager", torch.float32), ("eager", torch.float16), ("compiled", torch.float32)]
)
def test_kl_chunk_kernels_match_fp64(kernel, dtype):
    """Each chunk's KL sum and its gradient coef * (p_s - p_t) from raw logits (x @ W.T) plus
    bias, scaled by 1/T, against fp64 log-softmaxes: on strided rows (the padded GEMM's output),
    in several row blocks with a ragged last one (eager on a CPU: 2**18 // 5000 = 52 rows a
    block), with the padding columns untouched. 'compiled' is Inductor's C++ (a compiler is
    needed: the test image has g++). fp16: the GPU's GEMM output without Triton (fp32 math)."""
    import distil.objectives.fused_head as fused_head

    n, v, T = 70, 5000, 2.0
    g = torch.Generator().manual_seed(11)
    s_raw = (torch.randn(n, v + 8, generator=g) * 6).to(dtype)[:, :v]
    t_raw = (torch.randn(n, v + 8, generator=g) * 6).to(dtype)[:, :v]
    s_b, t_b = torch.randn(v, generator=g).to(dtype), torch.randn(v, generator=g).to(dtype)
    # The reference rounds (raw + b) / T to `dtype` as the kernels' one pass in place does.
    ls = F.log_softmax(((s_raw.double() + s_b.double()) / T).to(dtype).double(), -1)
    lt = F.log_softmax(((t_raw.double() + t_b.double()) / T).to(dtype).double(), -1)
    want_kl, want_g = (lt.exp() * (lt - ls)).sum(), 0.37 * (ls.exp() - lt.exp())
    fused_head.set_kl_kernel(kernel)
    try:
        fn = fused_head._kl_impl(torch.device("cpu"))

        def strided(x):  # a fresh copy with the padded GEMM's row stride (the kernels overwrite it)
            y = torch.empty((n, v + 8), dtype=dtype)
            y[:, :v] = x
            return y[:, :v]

        buf = torch.full((n, v + 8), 7.0, dtype=dtype)
        kl = fn(strided(s_raw), s_b, strided(t_raw), t_b, 1 / T, torch.tensor(0.37), buf[:, :v])
        kl_no_grad = fn(strided(s_raw), s_b, strided(t_raw), t_b, 1 / T, torch.tensor(0.37), None)
    finally:
        fused_head.set_kl_kernel("auto")
    assert abs(float(kl) - float(want_kl)) <= 1e-6 * float(want_kl)
    assert abs(float(kl_no_grad) - float(kl)) <= 1e-6 * float(want_kl)
    err = float((buf[:, :v].double() - want_g).abs().max())
    # A few fp32 ulps of |g| <= 0.37 (exp of arguments up to ~20), as the Triton test; in fp16,
    # one rounding of g (<= 0.37 * 2**-11).
    assert err <= (1e-6 if dtype == torch.float32 else 0.37 * 2**-11), err
    assert bool((buf[:, v:] == 7.0).all())
