"""The teacher: its config read first (enough to check the run before any weights are loaded),
the checks a run must pass against its shape, its weights (fp32, frozen) and its tokenizer."""

from __future__ import annotations

# Imports inside functions: safetensors only to check a local teacher's weight files.
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig

from distil.config.schema import DistilConfig
from distil.errors import UserError
from distil.model.student_shape import StudentShape


def load_teacher_config(cfg: DistilConfig) -> PretrainedConfig:
    """Read only the teacher's config.json: enough to validate the run before loading weights."""
    name = cfg.teacher.name_or_path
    cfg.check_teacher_folder()
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), revision=cfg.teacher.revision)
    except (OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set: the hub is not consulted)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(
            f"cannot load the teacher {name!r}{offline}: {str(e).splitlines()[0]}",
            where="teacher.name_or_path",
            fix="use a local model folder, or a hub id that exists and is reachable",
        ) from None


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

    from safetensors import safe_open

    folder = Path(cfg.teacher.name_or_path).expanduser()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:
            raise UserError(
                f"the teacher's weight file {f} is damaged or incomplete: {str(e).splitlines()[0][:200]}",
                where="teacher.name_or_path",
                fix="download or save the teacher again",
            ) from None


def validate_against_teacher(cfg: DistilConfig, tconfig: PretrainedConfig) -> None:
    """Checks that need the teacher's shape; raise UserError before anything is loaded or written."""
    check_teacher_weights(cfg)
    n_layers = tconfig.num_hidden_layers
    bad = [i for i in cfg.student.layers if not 0 <= i < n_layers]
    if bad:
        raise UserError(
            f"layers {bad} do not exist: the teacher has {n_layers} layers (0..{n_layers - 1})",
            where="student.layers",
            fix=f"choose indices between 0 and {n_layers - 1}",
        )
    if len(set(cfg.student.layers)) != len(cfg.student.layers):
        raise UserError("a teacher layer is listed twice", where="student.layers", fix="list each layer once")
    limit = max_positions(tconfig)
    if cfg.data.max_len > limit:
        raise UserError(
            f"max_len {cfg.data.max_len} is beyond the teacher's {limit} positions",
            where="data.max_len",
            fix=f"set data.max_len to at most {limit}",
        )
    heads = [a for a in (tconfig.architectures or []) if "MaskedLM" in a or "ForPreTraining" in a]
    if cfg.loss.needs_logits and tconfig.architectures and not heads:
        raise UserError(
            f"the teacher ({', '.join(tconfig.architectures)}) has no trained MLM head, but alpha_kl, alpha_mlm "
            "or alpha_mse reads its logits",
            where="loss",
            fix="set loss.alpha_kl, loss.alpha_mlm and loss.alpha_mse to 0 and use hidden-state losses (alpha_cos, alpha_mse_hidden)",
        )
    if cfg.student.architecture == "distilbert" and tconfig.model_type != "bert":
        raise UserError(
            f"architecture 'distilbert' needs a BERT teacher, this one is {tconfig.model_type!r}",
            where="student.architecture",
            fix="use architecture: same",
        )
    _check_shape_terms(cfg, tconfig)


def _check_shape_terms(cfg: DistilConfig, tconfig: PretrainedConfig) -> None:
    """The student's widths, and the attention terms they allow."""
    shape, t_shape, loss = StudentShape.for_student(cfg.student, tconfig), StudentShape.of(tconfig), cfg.loss
    if loss.alpha_relation:
        for who, width in (("student", shape.hidden), ("teacher", t_shape.hidden)):
            if width % loss.relation_heads:
                raise UserError(
                    f"{loss.relation_heads} relation heads do not divide the {who}'s width {width}",
                    where="loss.relation_heads",
                    fix="choose a count that divides both widths (e.g. 12 for 384 and 768)",
                )
        layer = loss.relation_teacher_layer
        if layer is not None and not 0 <= layer < tconfig.num_hidden_layers:
            raise UserError(
                f"teacher layer {layer} does not exist (0..{tconfig.num_hidden_layers - 1})",
                where="loss.relation_teacher_layer",
                fix="choose one of the teacher's layers, or unset it",
            )
    if loss.alpha_attention and shape.heads != t_shape.heads:
        raise UserError(
            f"the attention-score term compares heads one by one: the student has {shape.heads}, the teacher "
            f"{t_shape.heads}",
            where="loss.alpha_attention",
            fix="give the student the teacher's head count, or use alpha_relation (any head count)",
        )


def load_teacher(cfg: DistilConfig, with_head: bool) -> nn.Module:
    """The teacher in fp32, eval mode, frozen. Without a head when no loss reads logits."""
    cls = AutoModelForMaskedLM if with_head else AutoModel
    name = os.path.expanduser(cfg.teacher.name_or_path)
    try:
        model = cls.from_pretrained(name, revision=cfg.teacher.revision, dtype=torch.float32)
    except Exception as e:  # truncated or damaged weights: safetensors, torch and OS errors alike
        raise UserError(
            f"cannot load the teacher's weights from {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
            where="teacher.name_or_path",
            fix="download or save the teacher again (its weight files are damaged or incomplete)",
        ) from None
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(cfg: DistilConfig):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.expanduser(cfg.teacher.name_or_path), revision=cfg.teacher.revision
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the teacher's tokenizer from {cfg.teacher.name_or_path!r}: {str(e).splitlines()[0][:300]}",
            where="teacher.name_or_path",
            fix="point it at a folder with the tokenizer files, or a reachable hub id",
        ) from None
    if tokenizer.mask_token_id is None:
        raise UserError("the teacher's tokenizer has no mask token", where="teacher.name_or_path")
    return tokenizer
