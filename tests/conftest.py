"""Tiny, real assets: tokenizers trained on committed text, random BERT-family teachers saved
with save_pretrained. No hub access (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
EN_TEXT = ASSETS / "en_brown_800.txt"
# The Brown genre probe, small: 90 passages of 90 texts, 32 tokens each.
PROBE = {
    "path": str(ROOT / "data" / "brown" / "brown_genres.tsv"),
    "text_column": "passage",
    "label_column": "genre",
    "group_column": "text_id",
    "max_rows": 90,
    "max_len": 32,
}
PL_TEXT = ASSETS / "pl_libreoffice_300.txt"
sys.path.insert(0, str(ROOT))


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer if hasattr(tok, "_tokenizer") else tok, **special)


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory) -> Path:
    """A BERT WordPiece tokenizer trained on the English fixture text, loadable with from_pretrained."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("wordpiece")
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train([str(EN_TEXT)], vocab_size=800, min_frequency=2, show_progress=False)
    tok.save_model(str(d))  # vocab.txt
    BertTokenizerFast.from_pretrained(str(d)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def wordpiece(wordpiece_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(wordpiece_dir))


@pytest.fixture(scope="session")
def charbpe():
    """HerBERT-style CharBPE ('</w>' ends a word), trained on the Polish fixture text."""
    from tokenizers.implementations import CharBPETokenizer

    tok = CharBPETokenizer(suffix="</w>", lowercase=False)
    tok.train(
        [str(PL_TEXT)], vocab_size=600, min_frequency=2, special_tokens=_SPECIALS, suffix="</w>", show_progress=False
    )
    return _wrap(
        tok,
        bos_token="<s>",
        cls_token="<s>",
        sep_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _roberta_style(implementation):
    """A BPE tokenizer of the given `tokenizers` implementation trained on the English text."""
    tok = implementation()
    tok.train([str(EN_TEXT)], vocab_size=600, min_frequency=2, special_tokens=_SPECIALS, show_progress=False)
    return _wrap(tok, cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


@pytest.fixture(scope="session")
def sentencepiece():
    """'▁' marks a word start (XLM-R / SentencePiece style)."""
    from tokenizers.implementations import SentencePieceBPETokenizer

    return _roberta_style(SentencePieceBPETokenizer)


@pytest.fixture(scope="session")
def bytebpe():
    """'Ġ' marks a word start (RoBERTa / GPT-2 byte-level BPE)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    return _roberta_style(ByteLevelBPETokenizer)


def tiny_bert_config(vocab_size: int, **kw):
    from transformers import BertConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )
    return BertConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, wordpiece) -> Path:
    """A random 4-layer BertForMaskedLM with the WordPiece tokenizer, as save_pretrained writes it."""
    import torch
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("teacher")
    BertForMaskedLM(tiny_bert_config(len(wordpiece))).save_pretrained(str(d))
    wordpiece.save_pretrained(str(d))
    return d


def base_config(teacher_dir: Path, tmp_path: Path, **sections) -> dict:
    """A small valid run config as a dict; sections override whole keys."""
    cfg = {
        "run": {"name": "t", "seed": 0},
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"layers": [0, 2]},
        "data": {
            "sources": [str(EN_TEXT)],
            "max_len": 32,
            "eval_fraction": 0.05,
            "eval_max_sequences": 16,
            "cache_dir": str(tmp_path / "cache"),
        },
        "masking": {"prob": 0.15},
        "loss": {"recipe": "distilbert", "alpha_kl": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1, "grad_clip": 1.0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "global_batch_size": 8, "log_every": 2, "progress_bar": False},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "storage": {"uri": str(tmp_path / "runs")},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, teacher_dir) -> tuple[dict, Path]:
    """One finished local run of `base_config` (6 steps, checkpoints at 3 and 6), trained once for
    the session through the real command line: (config, run folder). Read it; copy it to change it."""
    import subprocess

    tmp = tmp_path_factory.mktemp("trained-run")
    cfg = base_config(teacher_dir, tmp)
    cfg["train"]["progress_bar"] = (
        True  # as configured by default, with no terminal (its log: tests/integration/test_logs.py)
    )
    cfg["eval"] = {"probe": PROBE}  # measured at steps 0 and 6, shown in the model card, the default of `distil eval`
    r = subprocess.run(
        [sys.executable, "-m", "distil.cli", "train", "--config", str(write_config(tmp / "c.yaml", cfg))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (tmp / "train.log").write_text(r.stdout + r.stderr)
    return cfg, tmp / "runs" / "t"


def fake_checkpoint(
    root: Path, tag: str, files: dict[str, bytes], complete: bool = True, step: int | None = None
) -> Path:
    """A checkpoint folder root/tag holding `files`, with COMPLETE and its manifest (size and
    sha256 of each) as `checkpoint.finalize` writes them; no model inside."""
    import json

    from distil.runs import layout as ckpt
    from distil.storage import integrity

    d = root / tag
    d.mkdir(parents=True)
    for name, body in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(body)
    if complete:
        manifest = {n: {"size": len(b), "sha256": integrity.sha256_file(d / n)} for n, b in files.items()}
        step = ckpt.step_of(tag) if step is None else step
        (d / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 1, "tokens": 10, "files": manifest}))
    return d


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def start_moto(log_dir: Path, env: dict | None = None):
    """moto_server on a free loopback port: (process, url)."""
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_dir / "moto.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except urllib.error.HTTPError:
            return proc, url  # it answers (with auth on, by refusing)
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 HTTP endpoint (moto_server) on 127.0.0.1; AWS credentials are dummies in the env."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint_with_auth(tmp_path_factory):
    """moto_server that checks credentials (moto's IAM emulation): the dummy keys are unknown to it."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto-auth"), {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(timeout=10)
