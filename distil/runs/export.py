"""A checkpoint -> a Hugging Face model folder.

Every checkpoint carries the student's HF config and the tokenizer in `hf/`; the weights
are the fp32 master copies merged from the ZeRO shards of every rank (whatever the world
size was), so the export loads with `AutoModelForMaskedLM.from_pretrained(DIR)`.
"""

from __future__ import annotations

# Imports inside functions: DeepSpeed's merge and transformers only where a model is exported.
import logging
import shutil
import tempfile
from pathlib import Path

from distil.errors import UserError
from distil.model.student import has_mlm_head
from distil.runs import layout as ckpt
from distil.runs.model_card import model_card

HF_DIR = "hf"
RUN_CONFIG = "distil_config.yaml"  # the run's resolved config, kept with the model (`distil eval` reads it)


def save_hf_skeleton(model, tokenizer, ckpt_dir: Path) -> None:
    """What an export needs besides the weights: the student's config and the tokenizer."""
    model.config.architectures = [type(model).__name__]  # tells the export which class to build
    model.config.save_pretrained(ckpt_dir / HF_DIR)
    tokenizer.save_pretrained(ckpt_dir / HF_DIR)


def fp32_state_dict(ckpt_dir: Path) -> dict:
    """The student's fp32 weights merged from all ZeRO shards of one checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    # The engine wrapped distil.model.student.MaskedLM, whose HF model sits under "model."; a narrower
    # student's "projection." serves the training losses only.
    return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}


def export_checkpoint(ckpt_dir: Path, out_dir: Path, hashed: bool = False, replace: bool = False) -> Path:
    """Write a HF model folder (safetensors, config, tokenizer) to out_dir; nothing partial on
    failure. `hashed`: the caller has just checked every file's sha256 (pull), sizes suffice.
    `replace`: a run's own `model/`, which an earlier export of the run may hold; it is swapped
    for the new one once that is complete (never a moment with a half-written folder)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir} is not a folder", fix="give a checkpoint folder, e.g. runs/NAME/step_00000100")
    problem = ckpt.damage(ckpt_dir, hashes=not hashed)  # sizes and sha256 of every file against COMPLETE's manifest
    if problem:
        raise UserError(
            f"{ckpt_dir} cannot be exported: {problem}",
            fix="export another checkpoint (`distil checkpoints list` shows them)",
        )
    stale = ckpt.unlisted_states(ckpt_dir, ckpt.read_complete(ckpt_dir)["files"])
    if stale:  # the merge would glob them in with the checkpoint's own shards
        raise UserError(
            f"{ckpt_dir} holds DeepSpeed state files its manifest does not list ({', '.join(stale[:3])}): "
            "leftovers of an unfinished save",
            fix="delete them (or resume the run, which does), then export",
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise UserError(f"{out_dir} exists and is not empty", fix="choose a new --out folder")
    config = AutoConfig.from_pretrained(ckpt_dir / HF_DIR)
    model = (AutoModelForMaskedLM if has_mlm_head(config) else AutoModel).from_config(config)
    missing, unexpected = model.load_state_dict(fp32_state_dict(ckpt_dir), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint does not match the student: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(ckpt_dir / HF_DIR).save_pretrained(tmp)
        if (ckpt_dir / "config.yaml").is_file():
            shutil.copy(ckpt_dir / "config.yaml", tmp / RUN_CONFIG)
        (tmp / "README.md").write_text(model_card(ckpt_dir, has_mlm_head(config)))
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return out_dir
