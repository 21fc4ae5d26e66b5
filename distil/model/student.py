"""The student made from its teacher, and one forward interface for both.

The student is the teacher's own architecture with k layers (or, for BERT teachers,
`DistilBertForMaskedLM` as DistilBERT was made), initialised by copying the chosen teacher
layers, the embeddings and the MLM head tensor for tensor. A narrower student (fewer
dimensions, heads or feed-forward units) takes from every tensor the same evenly spaced
subset of the teacher's heads, dimensions within a head, and feed-forward units ("weight
selection", Xu et al. 2024): the residual stream of the student is a subset of the
teacher's, and its heads are some of the teacher's heads. distil/model/student_shape.py has the
shapes and the index sets.

`MaskedLM` wraps either model so the loss sees one interface: all hidden states, plus LM
logits only at the flat positions a loss needs. Projecting every position through a
30k-vocabulary head is most of the step's memory; projecting only the needed ones is not.
"""

from __future__ import annotations

import copy
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertModel, PretrainedConfig

from distil.errors import UserError
from distil.model.student_shape import Selection, StudentShape

_LAYER_KEY = re.compile(r"^(.*\bencoder\.layer\.)(\d+)(\..*)$")


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of `model` to `p`, its config left as it is. Hugging Face's attention reads
    its probability from the module (`self.dropout.p`), so this covers attention dropout too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_student(
    teacher: nn.Module,
    layers: list[int],
    architecture: str = "same",
    shape: StudentShape | None = None,
    init: str = "teacher",
) -> nn.Module:
    """A k-layer student whose tensors are copies of the teacher's chosen layers, embeddings and
    head (of the selected heads, dimensions and units when `shape` is narrower); `init`
    'random': the same architecture, randomly initialised."""
    shape = shape or StudentShape.of(teacher.config)
    if architecture == "distilbert":
        student, mapped = _distilbert_from_bert(teacher, layers, shape)
    else:
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = len(layers)
        config.hidden_size, config.num_attention_heads, config.intermediate_size = (
            shape.hidden,
            shape.heads,
            shape.intermediate,
        )
        if (
            getattr(config, "embedding_size", None) == teacher.config.hidden_size
        ):  # ELECTRA: embeddings of the model's width
            config.embedding_size = shape.hidden
        student = type(teacher)(config)
        source = teacher.state_dict()
        mapped = {}
        for key in student.state_dict():
            m = _LAYER_KEY.match(key)
            mapped[key] = source[f"{m[1]}{layers[int(m[2])]}{m[3]}" if m else key]
    if init == "random":
        return student
    select = Selection(StudentShape.of(teacher.config), shape)
    student.load_state_dict({k: select(v, student.state_dict()[k].shape, k) for k, v in mapped.items()}, strict=True)
    return student


def _distilbert_from_bert(teacher: nn.Module, layers: list[int], shape: StudentShape) -> tuple[nn.Module, dict]:
    """DistilBERT's architecture from a BERT teacher, with the tensor mapping DistilBERT used.

    BERT adds token_type_embeddings[0] to every token (no segment ids are fed); DistilBERT has
    no segment embedding, so that row is folded into the position embeddings: the student's
    embedding output equals the teacher's.
    """
    t = teacher.config
    with_head = hasattr(teacher, "cls")
    config = DistilBertConfig(
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        n_layers=len(layers),
        n_heads=shape.heads,
        dim=shape.hidden,
        hidden_dim=shape.intermediate,
        dropout=t.hidden_dropout_prob,
        attention_dropout=t.attention_probs_dropout_prob,
        activation=t.hidden_act,
        pad_token_id=t.pad_token_id,
        initializer_range=t.initializer_range,
    )
    student = DistilBertForMaskedLM(config) if with_head else DistilBertModel(config)
    src = teacher.state_dict()
    bp = "bert." if with_head else ""
    dp = "distilbert." if with_head else ""
    emb = f"{bp}embeddings."
    sd = {
        f"{dp}embeddings.word_embeddings.weight": src[emb + "word_embeddings.weight"],
        f"{dp}embeddings.position_embeddings.weight": src[emb + "position_embeddings.weight"]
        + src[emb + "token_type_embeddings.weight"][0],
        f"{dp}embeddings.LayerNorm.weight": src[emb + "LayerNorm.weight"],
        f"{dp}embeddings.LayerNorm.bias": src[emb + "LayerNorm.bias"],
    }
    names = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    for i, j in enumerate(layers):
        for new, old in names.items():
            for p in ("weight", "bias"):
                sd[f"{dp}transformer.layer.{i}.{new}.{p}"] = src[f"{bp}encoder.layer.{j}.{old}.{p}"]
    if with_head:
        sd.update(
            {
                "vocab_transform.weight": src["cls.predictions.transform.dense.weight"],
                "vocab_transform.bias": src["cls.predictions.transform.dense.bias"],
                "vocab_layer_norm.weight": src["cls.predictions.transform.LayerNorm.weight"],
                "vocab_layer_norm.bias": src["cls.predictions.transform.LayerNorm.bias"],
                "vocab_projector.weight": src["cls.predictions.decoder.weight"],
                "vocab_projector.bias": src["cls.predictions.bias"],
            }
        )
    return student, sd


def has_mlm_head(config: PretrainedConfig) -> bool:
    """Whether a saved model's architecture has a masked-LM head (else it loads as a bare encoder)."""
    return any("MaskedLM" in a for a in (config.architectures or []))


def _head(model: nn.Module):
    """(transform, decoder) of the MLM head: logits = decoder(transform(last hidden states)),
    with decoder a Linear (usually tied to the word embeddings); None for a bare encoder."""
    if isinstance(model, DistilBertForMaskedLM):
        return (lambda h: model.vocab_layer_norm(model.activation(model.vocab_transform(h)))), model.vocab_projector
    if hasattr(model, "generator_lm_head"):  # ELECTRA generator
        return model.generator_predictions, model.generator_lm_head
    if hasattr(model, "cls"):  # BERT, HerBERT
        return model.cls.predictions.transform, model.cls.predictions.decoder
    if hasattr(model, "lm_head"):  # RoBERTa, XLM-R, CamemBERT
        head = model.lm_head
        return (lambda h: head.layer_norm(F.gelu(head.dense(h)))), head.decoder
    return None


class HeadOutput(NamedTuple):
    """Logits not computed yet: features @ weight.T + bias. The losses compute them a few rows at
    a time (distil.objectives.losses), so no [positions x vocab] tensor has to exist whole."""

    features: torch.Tensor  # [N, H'] after the head's transform
    weight: torch.Tensor  # [V, H']
    bias: torch.Tensor | None

    def logits(self) -> torch.Tensor:
        return F.linear(self.features, self.weight, self.bias)


def student_projection(teacher: StudentShape, student: StudentShape, init: str = "teacher") -> nn.Linear:
    """The learned map of a narrower student's hidden states into the teacher's width, for the
    hidden-state losses; trained with the student, kept in checkpoints, dropped at export. It
    starts as the weight selection's embedding (student dimension j -> teacher dimension
    hidden[j]), or random with `init` 'random'."""
    projection = nn.Linear(student.hidden, teacher.hidden, bias=False)
    if init != "random":
        with torch.no_grad():
            projection.weight.copy_(Selection(teacher, student).projection_init())
    return projection


def attention_projections(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The query, key and value Linear modules of one encoder layer (BERT family, DistilBERT)."""
    base = model.base_model
    for prefix, names in (
        (f"encoder.layer.{layer}.attention.self", ("query", "key", "value")),
        (f"transformer.layer.{layer}.attention", ("q_lin", "k_lin", "v_lin")),
    ):
        try:
            return tuple(base.get_submodule(f"{prefix}.{n}") for n in names)
        except AttributeError:
            continue
    raise UserError(
        f"{type(model).__name__} has no query/key/value projections where BERT-family models have them",
        where="loss.alpha_relation",
        fix="set loss.alpha_relation and loss.alpha_attention to 0 for this model",
    )


class MaskedLM(nn.Module):
    """Hidden states of every layer, and logits at selected flat positions only; for a narrower
    student, the `projection` of its hidden states into the teacher's width."""

    def __init__(self, model: nn.Module, projection: nn.Linear | None = None):
        super().__init__()
        self.model = model
        self.projection = projection  # a submodule: trained, and saved with the engine's state (export drops it)
        # Closures and references, not submodules: assigning would register the weights twice.
        self._parts = _head(model)

    @property
    def has_head(self) -> bool:
        return self._parts is not None

    def _head_output(self, features: torch.Tensor) -> HeadOutput:
        transform, decoder = self._parts
        return HeadOutput(transform(features), decoder.weight, decoder.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        lazy_logits: bool = False,
        qkv_layers: tuple[int, ...] = (),
    ):
        """Returns (hidden_states, logits): hidden_states[0] is the embedding output, [-1] the last
        layer, each [B, L, H]; logits is [len(positions), V] for flat indices into B*L (a
        HeadOutput when lazy_logits), or None without positions or without a head. With
        `qkv_layers`, a third item: {layer: (queries, keys, values)}, each [B, L, H], the outputs of
        that layer's attention projections (for the relation and attention-score losses)."""
        qkv: dict[int, list] = {i: [None, None, None] for i in qkv_layers}
        hooks = []
        for i in qkv_layers:
            for j, module in enumerate(attention_projections(self.model, i)):
                hooks.append(module.register_forward_hook(lambda _m, _in, out, i=i, j=j: qkv[i].__setitem__(j, out)))
        try:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        hidden = out.hidden_states
        logits = None
        if positions is not None and self._parts is not None:
            last = hidden[-1].reshape(-1, hidden[-1].shape[-1]).index_select(0, positions)
            head = self._head_output(last)
            logits = head if lazy_logits else head.logits()
        if qkv_layers:
            return hidden, logits, {i: tuple(v) for i, v in qkv.items()}
        return hidden, logits
