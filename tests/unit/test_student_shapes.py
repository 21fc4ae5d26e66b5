"""Students of any shape: a narrower student's weights selected from its teacher's (checked
index by index against the rule written out by hand), its projection, the shapes refused; the
MiniLMv2 relation term and TinyBERT's attention-score term equal to loop-by-loop computations,
values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from distil.config.schema import load_config
from distil.errors import UserError
from distil.model.student import MaskedLM, build_student, student_projection
from distil.model.student_shape import StudentShape
from distil.model.teacher import validate_against_teacher
from distil.objectives.relations import attention_score_mse, relation_kl
from tests.conftest import tiny_bert_config


@pytest.fixture(scope="module")
def teacher():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config(120)).eval()  # 4 layers, 32 wide, 2 heads of 16, feed-forward 64


def test_a_narrower_student_takes_the_same_heads_dimensions_and_units_from_every_tensor(teacher):
    shape = StudentShape(hidden=16, heads=2, intermediate=32)  # 2 heads of 8
    student = build_student(teacher, [1, 3], shape=shape)
    # by hand: both heads, and of each head's 16 dimensions the middles of 8 equal shares (1, 3, ..., 15)
    hidden = [h * 16 + d for h in (0, 1) for d in range(1, 16, 2)]
    units = list(range(1, 64, 2))
    t, s = teacher.state_dict(), student.state_dict()
    assert s["bert.encoder.layer.0.attention.self.query.weight"].shape == (16, 16)
    assert torch.equal(
        s["bert.encoder.layer.0.attention.self.query.weight"],
        t["bert.encoder.layer.1.attention.self.query.weight"][hidden][:, hidden],
    )
    assert torch.equal(
        s["bert.encoder.layer.1.attention.self.value.bias"], t["bert.encoder.layer.3.attention.self.value.bias"][hidden]
    )
    assert torch.equal(
        s["bert.encoder.layer.1.intermediate.dense.weight"],
        t["bert.encoder.layer.3.intermediate.dense.weight"][units][:, hidden],
    )
    assert torch.equal(
        s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"][hidden][:, units]
    )
    assert torch.equal(
        s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"][:, hidden]
    )
    assert torch.equal(s["bert.embeddings.LayerNorm.weight"], t["bert.embeddings.LayerNorm.weight"][hidden])
    assert torch.equal(
        s["cls.predictions.transform.dense.weight"], t["cls.predictions.transform.dense.weight"][hidden][:, hidden]
    )
    assert torch.equal(s["cls.predictions.bias"], t["cls.predictions.bias"])
    assert (
        student.config.hidden_size == 16
        and student.config.num_attention_heads == 2
        and student.config.intermediate_size == 32
    )
    assert student(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 120)
    # fewer heads of the full head size: the middle head of each pair... here 1 of 2: head 1
    one = build_student(teacher, [0], shape=StudentShape(hidden=16, heads=1, intermediate=64)).state_dict()
    assert torch.equal(
        one["bert.encoder.layer.0.attention.self.key.weight"],
        t["bert.encoder.layer.0.attention.self.key.weight"][16:32][:, 16:32],
    )
    # the projection starts as the same selection: student dimension j at teacher dimension hidden[j]
    projection = student_projection(StudentShape.of(teacher.config), shape)
    x = torch.randn(3, 16)
    assert torch.equal(projection(x)[:, hidden], x) and projection(x).abs().sum() == x.abs().sum()


def test_same_width_is_the_plain_copy_and_random_init_is_not(teacher):
    same = build_student(teacher, [0, 2]).state_dict()
    t = teacher.state_dict()
    assert torch.equal(same["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.2.output.dense.weight"])
    torch.manual_seed(1)
    rand = build_student(teacher, [0, 2], init="random").state_dict()
    assert not torch.equal(
        rand["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.2.output.dense.weight"]
    )


def test_narrow_distilbert_architecture(teacher):
    shape = StudentShape(hidden=16, heads=2, intermediate=32)
    student = build_student(teacher, [0, 3], architecture="distilbert", shape=shape)
    hidden = [h * 16 + d for h in (0, 1) for d in range(1, 16, 2)]
    t = teacher.state_dict()
    assert torch.equal(
        student.state_dict()["distilbert.transformer.layer.1.attention.q_lin.weight"],
        t["bert.encoder.layer.3.attention.self.query.weight"][hidden][:, hidden],
    )
    assert student.config.dim == 16 and student.config.n_heads == 2


def _cfg(**student_and_loss):
    sets = [f"{k.replace('__', '.')}={v}" for k, v in student_and_loss.items()]
    return load_config(
        None,
        [
            "teacher.name_or_path=x",
            "student.layers=[0, 1]",
            "data.sources=[x]",
            "data.max_len=32",
            "train.max_steps=1",
            *sets,
        ],
    )


@pytest.mark.parametrize(
    "sets, where",
    [
        ({"student__hidden_size": 64}, "student.hidden_size"),  # wider than the teacher
        ({"student__hidden_size": 16, "student__num_attention_heads": 3}, "student.num_attention_heads"),
        (
            {
                "student__hidden_size": 24,
                "student__num_attention_heads": 2,
                "loss__alpha_relation": 1,
                "loss__relation_heads": 16,
            },
            "loss.relation_heads",
        ),
        (
            {"student__hidden_size": 16, "student__num_attention_heads": 1, "loss__alpha_attention": 1},
            "loss.alpha_attention",
        ),
        (
            {"loss__alpha_relation": 1, "loss__relation_heads": 2, "loss__relation_teacher_layer": 4},
            "loss.relation_teacher_layer",
        ),
    ],
)
def test_shapes_and_terms_that_cannot_work_are_refused(monkeypatch, sets, where):
    monkeypatch.setattr("distil.model.teacher.check_teacher_weights", lambda cfg: None)
    with pytest.raises(UserError) as e:
        validate_against_teacher(_cfg(**sets), tiny_bert_config(120))
    assert e.value.where == where, str(e.value)


def _naive_relation_kl(s, t, mask, heads):
    """KL(teacher || student) of softmax(x_r x_r^T / sqrt(d_r)) over valid keys, row by row."""
    total = 0.0
    for xs, xt in zip(s, t):
        kls = []
        for b in range(xs.shape[0]):
            valid = [j for j in range(xs.shape[1]) if mask[b, j]]
            ds, dt = xs.shape[2] // heads, xt.shape[2] // heads
            for r in range(heads):
                qs, qt = xs[b, valid, r * ds : (r + 1) * ds], xt[b, valid, r * dt : (r + 1) * dt]
                for i in range(len(valid)):
                    ps = torch.softmax(torch.stack([qs[i] @ qs[j] for j in range(len(valid))]) / math.sqrt(ds), 0)
                    pt = torch.softmax(torch.stack([qt[i] @ qt[j] for j in range(len(valid))]) / math.sqrt(dt), 0)
                    kls.append((pt * (pt.log() - ps.log())).sum())
        total = total + torch.stack(kls).mean()
    return total


def test_relation_kl_equals_the_loop_and_its_gradient_too():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    s = tuple(torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))  # 12 wide
    t = tuple(torch.randn(2, 5, 24, generator=g, dtype=torch.float64) for _ in range(3))  # 24 wide: another width
    fast, slow = relation_kl(s, t, mask, heads=3), _naive_relation_kl(s, t, mask, 3)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-6)  # (the term computes in fp32)
    g_fast = torch.autograd.grad(fast, s)
    g_slow = torch.autograd.grad(slow, s)
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a.double(), b, atol=1e-6) and not a[1, 3:].any()  # padded positions get no gradient
    assert float(relation_kl(t, t, mask, heads=3)) == pytest.approx(0.0, abs=1e-6)


def test_attention_score_mse_equals_the_loop_and_its_gradient_too():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s_q, s_k = (torch.randn(2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t_q, t_k = (torch.randn(2, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    fast = attention_score_mse(s_q, s_k, t_q, t_k, mask, heads=2)
    diffs = []
    for b in range(2):
        for h in range(2):
            for i in range(4):
                for j in range(4):
                    if mask[b, i] and mask[b, j]:
                        ss = s_q[b, i, h * 4 : (h + 1) * 4] @ s_k[b, j, h * 4 : (h + 1) * 4] / 2.0
                        ts = t_q[b, i, h * 8 : (h + 1) * 8] @ t_k[b, j, h * 8 : (h + 1) * 8] / math.sqrt(8)
                        diffs.append((ss - ts) ** 2)
    slow = torch.stack(diffs).mean()
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-6)  # (the term computes in fp32)
    for a, b in zip(torch.autograd.grad(fast, (s_q, s_k)), torch.autograd.grad(slow, (s_q, s_k))):
        assert torch.allclose(a.double(), b, atol=1e-5)


def test_the_relation_term_reads_the_models_own_projections(teacher):
    """MaskedLM hands out the outputs of a layer's query/key/value Linears: the relation term
    of the teacher with itself is 0, and a narrower student's is positive."""
    from distil.config.sections import LossSection
    from distil.objectives.losses import DistillationLoss, distillation_forward

    loss = DistillationLoss(
        LossSection(alpha_kl=0, alpha_mlm=0, alpha_cos=1, alpha_relation=1, relation_heads=4),
        [1, 3],
        teacher_layers=4,
        heads=(2, 2),
    )
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 4:] = 0
    labels = torch.full_like(ids, -100)
    t = MaskedLM(teacher)
    hidden, _, qkv = t(ids, attn, qkv_layers=(3,))
    q = teacher.bert.encoder.layer[3].attention.self.query(hidden[3])
    assert torch.allclose(qkv[3][0], q, atol=1e-6)  # the query projection of layer 3's input
    shape = StudentShape(hidden=16, heads=2, intermediate=32)
    student = MaskedLM(
        build_student(teacher, [1, 3], shape=shape), student_projection(StudentShape.of(teacher.config), shape)
    )
    terms = distillation_forward(student, t, loss, ids, attn, labels)
    assert float(terms["relation"].detach()) > 0 and float(terms["cos"].detach()) > 0
    terms["loss"].backward()
    assert (
        student.projection.weight.grad.abs().sum() > 0
        and student.model.bert.encoder.layer[1].attention.self.key.weight.grad.abs().sum() > 0
    )
    same = distillation_forward(
        MaskedLM(build_student(teacher, [0, 1, 2, 3]).eval()),
        t,
        DistillationLoss(
            LossSection(alpha_kl=0, alpha_mlm=0, alpha_cos=0, alpha_relation=1, relation_heads=4), [0, 1, 2, 3], 4
        ),
        ids,
        attn,
        labels,
    )
    assert float(same["relation"]) == pytest.approx(0.0, abs=1e-6)


def test_sentence_terms_equal_a_direct_computation_values_and_gradients():
    """sentence_mse and similarity_mse from mean-pooled embeddings, against sums written out."""
    from distil.config.sections import LossSection
    from distil.objectives.losses import DistillationLoss

    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    s_last = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t_last = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    loss = DistillationLoss(
        LossSection(
            alpha_kl=0, alpha_mlm=0, alpha_cos=0, alpha_sentence_mse=1, alpha_similarity=1, alpha_similarity_corr=1
        ),
        [0],
    )
    positions = torch.nonzero(mask.reshape(-1)).squeeze(1)
    terms = loss((s_last,), (t_last,), None, None, positions, torch.full((3, 4), -100), attention_mask=mask)

    def pooled(x):
        return torch.stack([sum(x[b, i] for i in range(4) if mask[b, i]) / int(mask[b].sum()) for b in range(3)])

    ps, pt = pooled(s_last), pooled(t_last)
    want_mse = sum((ps[b, d] - pt[b, d]) ** 2 for b in range(3) for d in range(6)) / 18
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    want_sim = sum((cos(ps[i], ps[j]) - cos(pt[i], pt[j])) ** 2 for i in range(3) for j in range(3)) / 9
    assert float(terms["sentence_mse"].detach()) == pytest.approx(float(want_mse.detach()), rel=1e-6)
    assert float(terms["similarity"].detach()) == pytest.approx(float(want_sim.detach()), rel=1e-5)
    from distil.objectives.sentence import similarity_corr  # (its own test: below) on the same pooled embeddings

    assert float(terms["similarity_corr"].detach()) == pytest.approx(float(similarity_corr(ps, pt).detach()), rel=1e-9)
    for got, want in ((terms["sentence_mse"], want_mse), (terms["similarity"], want_sim)):
        (a,), (b,) = (
            torch.autograd.grad(got, s_last, retain_graph=True),
            torch.autograd.grad(want, s_last, retain_graph=True),
        )
        assert torch.allclose(a.double(), b, atol=1e-6) and not a[0, 3].any()  # a pad token gets no gradient


def test_similarity_corr_is_one_minus_pearson_of_the_pairs_values_and_gradients():
    """1 - Pearson r of the off-diagonal cosine similarities, against numpy's corrcoef over the
    pairs written out; the gradient against autograd through that direct computation."""
    import numpy as np

    from distil.objectives.sentence import similarity_corr

    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    a, b = torch.stack([cos(s[i], s[j]) for i, j in pairs]), torch.stack([cos(t[i], t[j]) for i, j in pairs])
    got = similarity_corr(s, t)
    assert float(got.detach()) == pytest.approx(1 - np.corrcoef(a.detach().numpy(), b.numpy())[0, 1], rel=1e-6)
    a0, b0 = a - a.mean(), b - b.mean()
    want = 1 - (a0 * b0).sum() / (a0.norm() * b0.norm())
    (dg,), (dw,) = torch.autograd.grad(got, s), torch.autograd.grad(want, s)
    assert torch.allclose(dg.double(), dw, atol=1e-6) and dg.abs().sum() > 0
    assert float(similarity_corr(s, 2 * s.detach() + 0)) == pytest.approx(0.0, abs=1e-6)  # the same relations, rescaled
    assert float(similarity_corr(s[:2], t[:2])) == 0.0  # one pair: no correlation to speak of
