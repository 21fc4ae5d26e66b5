"""Teacher loading, student construction, and one forward interface for both.

The student is the teacher's own architecture with k layers (or, for BERT teachers,
`DistilBertForMaskedLM` as DistilBERT was made), initialised by copying the chosen teacher
layers, the embeddings and the MLM head tensor for tensor.

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


def build_student(teacher: nn.Module, layers: list[int], architecture: str = "same") -> nn.Module:
    """A k-layer student whose tensors are copies of the teacher's chosen layers, embeddings and head."""
    if architecture == "distilbert":
        return _distilbert_from_bert(teacher, layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)
    source = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        m = _LAYER_KEY.match(key)
        mapped[key] = source[f"{m[1]}{layers[int(m[2])]}{m[3]}" if m else key]
    student.load_state_dict(mapped, strict=True)
    return student


def _distilbert_from_bert(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """DistilBERT's architecture from a BERT teacher, with the tensor mapping DistilBERT used.

    BERT adds token_type_embeddings[0] to every token (no segment ids are fed); DistilBERT has
    no segment embedding, so that row is folded into the position embeddings: the student's
    embedding output equals the teacher's.
    """
    t = teacher.config
    with_head = hasattr(teacher, "cls")
    config = DistilBertConfig(vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                              n_layers=len(layers), n_heads=t.num_attention_heads, dim=t.hidden_size,
                              hidden_dim=t.intermediate_size, dropout=t.hidden_dropout_prob,
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
    student.load_state_dict(sd, strict=True)
    return student


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


class MaskedLM(nn.Module):
    """Hidden states of every layer, and logits at selected flat positions only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # Closures and references, not submodules: assigning would register the weights twice.
        self._parts = _head(model)

    @property
    def has_head(self) -> bool:
        return self._parts is not None

    def _head_output(self, features: torch.Tensor) -> HeadOutput:
        transform, decoder = self._parts
        return HeadOutput(transform(features), decoder.weight, decoder.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
                lazy_logits: bool = False):
        """Returns (hidden_states, logits): hidden_states[0] is the embedding output, [-1] the last
        layer, each [B, L, H]; logits is [len(positions), V] for flat indices into B*L (a
        HeadOutput when lazy_logits), or None without positions or without a head."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states
        if positions is None or self._parts is None:
            return hidden, None
        last = hidden[-1].reshape(-1, hidden[-1].shape[-1]).index_select(0, positions)
        head = self._head_output(last)
        return hidden, head if lazy_logits else head.logits()
