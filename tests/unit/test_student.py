"""Students copy the teacher's tensors exactly; the head adapter equals the model's own logits."""

import pytest
import torch
from transformers import (
    BertForMaskedLM,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from distil.model.student import MaskedLM, build_student
from tests.conftest import tiny_bert_config


def tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(tiny_bert_config(120)).eval()
    if kind == "roberta":
        return RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=120,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=66,
                pad_token_id=1,
            )
        ).eval()
    return ElectraForMaskedLM(
        ElectraConfig(
            vocab_size=120,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_same_architecture_copies_chosen_layers(kind):
    teacher = tiny(kind)
    student = build_student(teacher, [3, 1])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        src = key.replace("encoder.layer.0.", "encoder.layer.3.").replace("encoder.layer.1.", "encoder.layer.1.")
        assert torch.equal(value, t[src]), key
    assert teacher.config.num_hidden_layers == 4, "the teacher's config must not change"
    # Tensors are copies: training the student cannot touch the teacher.
    assert all(p.data_ptr() != q.data_ptr() for p in student.parameters() for q in teacher.parameters())


def test_all_layers_reproduce_the_teacher():
    teacher = tiny("bert")
    student = build_student(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(5, 120, (2, 9))
    attn = torch.ones_like(ids)
    assert torch.equal(teacher(ids, attention_mask=attn).logits, student(ids, attention_mask=attn).logits)


def test_distilbert_architecture_from_bert():
    teacher = tiny("bert")
    student = build_student(teacher, [0, 2], "distilbert").eval()
    assert isinstance(student, DistilBertForMaskedLM)
    t, s = teacher.state_dict(), student.state_dict()
    pairs = {
        "distilbert.transformer.layer.1.attention.q_lin.weight": "bert.encoder.layer.2.attention.self.query.weight",
        "distilbert.transformer.layer.0.ffn.lin2.bias": "bert.encoder.layer.0.output.dense.bias",
        "distilbert.transformer.layer.1.output_layer_norm.weight": "bert.encoder.layer.2.output.LayerNorm.weight",
        "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "vocab_transform.weight": "cls.predictions.transform.dense.weight",
        "vocab_projector.bias": "cls.predictions.bias",
    }
    for new, old in pairs.items():
        assert torch.equal(s[new], t[old]), new
    folded = t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(s["distilbert.embeddings.position_embeddings.weight"], folded)
    # With every layer, DistilBERT's architecture computes what the BERT teacher computes.
    full = build_student(teacher, [0, 1, 2, 3], "distilbert").eval()
    ids = torch.randint(5, 120, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    ref, got = teacher(ids, attention_mask=attn).logits, full(ids, attention_mask=attn).logits
    assert torch.allclose(ref[attn.bool()], got[attn.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "distilbert"])
def test_head_at_positions_equals_model_logits(kind):
    model = build_student(tiny("bert"), [0, 1], "distilbert").eval() if kind == "distilbert" else tiny(kind)
    ids = torch.randint(5, 120, (2, 9))
    attn = torch.ones_like(ids)
    positions = torch.tensor([0, 4, 10, 17])
    hidden, logits = MaskedLM(model)(ids, attn, positions)
    full = model(ids, attention_mask=attn, output_hidden_states=True)
    assert torch.allclose(logits, full.logits.reshape(-1, full.logits.shape[-1])[positions], atol=1e-6, rtol=0)
    lazy = MaskedLM(model)(ids, attn, positions, lazy_logits=True)[1]
    assert torch.equal(lazy.logits(), logits)
    assert len(hidden) == model.config.num_hidden_layers + 1 if kind != "distilbert" else len(hidden) == 3


@pytest.mark.parametrize("architecture", ["same", "distilbert"])
def test_set_dropout_reaches_every_dropout_and_leaves_the_config(architecture):
    """With dropout 0 a student in train mode computes what it does in eval mode; the config (what
    export writes, for whoever fine-tunes the student) keeps the teacher's probabilities."""
    from distil.model.student import set_dropout

    teacher = tiny("bert")
    teacher.config.hidden_dropout_prob = teacher.config.attention_probs_dropout_prob = 0.5
    student = build_student(teacher, [0, 2], architecture)
    ids, attn = torch.randint(5, 120, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    student.train()
    noisy = student(input_ids=ids, attention_mask=attn).logits
    assert not torch.equal(noisy, student(input_ids=ids, attention_mask=attn).logits)  # dropout is on: it can fail
    set_dropout(student, 0.0)
    trained_mode = student(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(trained_mode, student.eval()(input_ids=ids, attention_mask=attn).logits)
    cfg = student.config.to_dict()
    assert cfg.get("hidden_dropout_prob", cfg.get("dropout")) == 0.5
