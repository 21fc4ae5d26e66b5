"""Teacher loading, student construction, and one forward interface for both.

The student is the teacher's own architecture with k layers (or, for BERT teachers,
`DistilBertForMaskedLM` as DistilBERT was made), initialised by copying the chosen teacher
layers, the embeddings and the MLM head tensor for tensor. A narrower student (fewer
dimensions, heads or feed-forward units) takes from every tensor the same evenly spaced
subset of the teacher's heads, dimensions within a head, and feed-forward units ("weight
selection", Xu et al. 2024): the residual stream of the student is a subset of the
teacher's, and its heads are some of the teacher's heads. distil/student_shape.py has the
shapes and the index sets.

`MaskedLM` wraps either model so the loss sees one interface: all hidden states, plus LM
logits only at the flat positions a loss needs. Projecting every position through a
30k-vocabulary head is most of the step's memory; projecting only the needed ones is not.
"""

from __future__ import annotations

import copy
import os
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, DistilBertModel, PretrainedConfig

from distil.config import DistilConfig
from distil.errors import UserError
from distil.student_shape import Selection, StudentShape

_LAYER_KEY = re.compile(r"^(.*\bencoder\.layer\.)(\d+)(\..*)$")


def load_teacher_config(cfg: DistilConfig) -> PretrainedConfig:
    """Read only the teacher's config.json: enough to validate the run before loading weights."""
    name = cfg.teacher.name_or_path
    cfg.check_teacher_folder()
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), revision=cfg.teacher.revision)
    except (OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set: the hub is not consulted)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"cannot load the teacher {name!r}{offline}: {str(e).splitlines()[0]}", where="teacher.name_or_path",
                        fix="use a local model folder, or a hub id that exists and is reachable") from None


def max_positions(tconfig: PretrainedConfig) -> int:
    """Longest sequence the teacher's position embeddings cover."""
    n = getattr(tconfig, "max_position_embeddings", None) or 10**9
    # RoBERTa-family position ids start after the padding index.
    if "roberta" in tconfig.model_type or tconfig.model_type in ("camembert", "xlm-roberta"):
        n -= (tconfig.pad_token_id or 0) + 1
    return n


def check_teacher_weights(cfg: DistilConfig) -> None:
    """A local teacher's safetensors files are whole: each one's header read, and its tensors
    covering the file (a truncated download is refused here, before anything is written, not
    when the weights are loaded)."""
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(cfg.teacher.name_or_path).expanduser()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:
            raise UserError(f"the teacher's weight file {f} is damaged or incomplete: {str(e).splitlines()[0][:200]}",
                            where="teacher.name_or_path", fix="download or save the teacher again") from None


def validate_against_teacher(cfg: DistilConfig, tconfig: PretrainedConfig) -> None:
    """Checks that need the teacher's shape; raise UserError before anything is loaded or written."""
    check_teacher_weights(cfg)
    n_layers = tconfig.num_hidden_layers
    bad = [i for i in cfg.student.layers if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"layers {bad} do not exist: the teacher has {n_layers} layers (0..{n_layers - 1})",
                        where="student.layers", fix=f"choose indices between 0 and {n_layers - 1}")
    if len(set(cfg.student.layers)) != len(cfg.student.layers):
        raise UserError("a teacher layer is listed twice", where="student.layers", fix="list each layer once")
    limit = max_positions(tconfig)
    if cfg.data.max_len > limit:
        raise UserError(f"max_len {cfg.data.max_len} is beyond the teacher's {limit} positions", where="data.max_len",
                        fix=f"set data.max_len to at most {limit}")
    heads = [a for a in (tconfig.architectures or []) if "MaskedLM" in a or "ForPreTraining" in a]
    if cfg.loss.needs_logits and tconfig.architectures and not heads:
        raise UserError(f"the teacher ({', '.join(tconfig.architectures)}) has no trained MLM head, but alpha_kl, alpha_mlm "
                        "or alpha_mse reads its logits", where="loss",
                        fix="set loss.alpha_kl, loss.alpha_mlm and loss.alpha_mse to 0 and use hidden-state losses (alpha_cos, alpha_mse_hidden)")
    if cfg.student.architecture == "distilbert" and tconfig.model_type != "bert":
        raise UserError(f"architecture 'distilbert' needs a BERT teacher, this one is {tconfig.model_type!r}",
                        where="student.architecture", fix="use architecture: same")
    _check_shape_terms(cfg, tconfig)


def _check_shape_terms(cfg: DistilConfig, tconfig: PretrainedConfig) -> None:
    """The student's widths, and the attention terms they allow."""
    shape, t_shape, loss = StudentShape.for_student(cfg.student, tconfig), StudentShape.of(tconfig), cfg.loss
    if loss.alpha_relation:
        for who, width in (("student", shape.hidden), ("teacher", t_shape.hidden)):
            if width % loss.relation_heads:
                raise UserError(f"{loss.relation_heads} relation heads do not divide the {who}'s width {width}",
                                where="loss.relation_heads", fix="choose a count that divides both widths (e.g. 12 for 384 and 768)")
        layer = loss.relation_teacher_layer
        if layer is not None and not 0 <= layer < tconfig.num_hidden_layers:
            raise UserError(f"teacher layer {layer} does not exist (0..{tconfig.num_hidden_layers - 1})",
                            where="loss.relation_teacher_layer", fix="choose one of the teacher's layers, or unset it")
    if loss.alpha_attention and shape.heads != t_shape.heads:
        raise UserError(f"the attention-score term compares heads one by one: the student has {shape.heads}, the teacher "
                        f"{t_shape.heads}", where="loss.alpha_attention",
                        fix="give the student the teacher's head count, or use alpha_relation (any head count)")


def load_teacher(cfg: DistilConfig, with_head: bool) -> nn.Module:
    """The teacher in fp32, eval mode, frozen. Without a head when no loss reads logits."""
    cls = AutoModelForMaskedLM if with_head else AutoModel
    name = os.path.expanduser(cfg.teacher.name_or_path)
    try:
        model = cls.from_pretrained(name, revision=cfg.teacher.revision, dtype=torch.float32)
    except Exception as e:  # truncated or damaged weights: safetensors, torch and OS errors alike
        raise UserError(f"cannot load the teacher's weights from {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        where="teacher.name_or_path", fix="download or save the teacher again (its weight files are damaged "
                                                          "or incomplete)") from None
    model.eval().requires_grad_(False)
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of `model` to `p`, its config left as it is. Hugging Face's attention reads
    its probability from the module (`self.dropout.p`), so this covers attention dropout too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_student(teacher: nn.Module, layers: list[int], architecture: str = "same", shape: StudentShape | None = None,
                  init: str = "teacher") -> nn.Module:
    """A k-layer student whose tensors are copies of the teacher's chosen layers, embeddings and
    head (of the selected heads, dimensions and units when `shape` is narrower); `init`
    'random': the same architecture, randomly initialised."""
    shape = shape or StudentShape.of(teacher.config)
    if architecture == "distilbert":
        student, mapped = _distilbert_from_bert(teacher, layers, shape)
    else:
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = len(layers)
        config.hidden_size, config.num_attention_heads, config.intermediate_size = shape.hidden, shape.heads, shape.intermediate
        if getattr(config, "embedding_size", None) == teacher.config.hidden_size:  # ELECTRA: embeddings of the model's width
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
    config = DistilBertConfig(vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                              n_layers=len(layers), n_heads=shape.heads, dim=shape.hidden, hidden_dim=shape.intermediate, dropout=t.hidden_dropout_prob,
                              attention_dropout=t.attention_probs_dropout_prob, activation=t.hidden_act,
                              pad_token_id=t.pad_token_id, initializer_range=t.initializer_range)
    student = DistilBertForMaskedLM(config) if with_head else DistilBertModel(config)
    src = teacher.state_dict()
    bp = "bert." if with_head else ""
    dp = "distilbert." if with_head else ""
    emb = f"{bp}embeddings."
    sd = {
        f"{dp}embeddings.word_embeddings.weight": src[emb + "word_embeddings.weight"],
        f"{dp}embeddings.position_embeddings.weight": src[emb + "position_embeddings.weight"] + src[emb + "token_type_embeddings.weight"][0],
        f"{dp}embeddings.LayerNorm.weight": src[emb + "LayerNorm.weight"],
        f"{dp}embeddings.LayerNorm.bias": src[emb + "LayerNorm.bias"],
    }
    names = {"attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
             "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
             "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
             "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm"}
    for i, j in enumerate(layers):
        for new, old in names.items():
            for p in ("weight", "bias"):
                sd[f"{dp}transformer.layer.{i}.{new}.{p}"] = src[f"{bp}encoder.layer.{j}.{old}.{p}"]
    if with_head:
        sd.update({"vocab_transform.weight": src["cls.predictions.transform.dense.weight"],
                   "vocab_transform.bias": src["cls.predictions.transform.dense.bias"],
                   "vocab_layer_norm.weight": src["cls.predictions.transform.LayerNorm.weight"],
                   "vocab_layer_norm.bias": src["cls.predictions.transform.LayerNorm.bias"],
                   "vocab_projector.weight": src["cls.predictions.decoder.weight"],
                   "vocab_projector.bias": src["cls.predictions.bias"]})
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
    a time (distil.losses), so no [positions x vocab] tensor has to exist whole."""

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
    for prefix, names in ((f"encoder.layer.{layer}.attention.self", ("query", "key", "value")),
                          (f"transformer.layer.{layer}.attention", ("q_lin", "k_lin", "v_lin"))):
        try:
            return tuple(base.get_submodule(f"{prefix}.{n}") for n in names)
        except AttributeError:
            continue
    raise UserError(f"{type(model).__name__} has no query/key/value projections where BERT-family models have them",
                    where="loss.alpha_relation", fix="set loss.alpha_relation and loss.alpha_attention to 0 for this model")


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
                lazy_logits: bool = False, qkv_layers: tuple[int, ...] = ()):
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
