"""`distil k8s submit` refuses what a cluster would refuse, before anything is sent: flags,
names (KubeRay's RayJob rule), the batch split over the GPUs. Rendered with --dry-run; no
Kubernetes API server can run on these machines (tests/integration/test_k8s_commands.py talks
to a mock of one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def submit(tmp_path, *args: str, name: str = "run-1") -> subprocess.CompletedProcess:
    cfg = {"run": {"name": name}, "teacher": {"name_or_path": "bert-base-uncased"}, "student": {"layers": [0, 2]},
           "data": {"sources": ["s3://b/corpus/"]}, "train": {"max_steps": 10, "micro_batch_size": 8, "global_batch_size": 64},
           "storage": {"uri": "s3://b/runs"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "distil.cli", "k8s", "submit", "--config", str(path), "--image", "img:1",
                           "--dry-run", *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args, name, where", [
    (["--workers", "-1"], "run-1", "--workers"),
    (["--workers", "0"], "run-1", "--workers"),
    (["--gpus-per-pod", "0"], "run-1", "--gpus-per-pod"),
    (["--grace-period", "5"], "run-1", "--grace-period"),
    (["--backoff-limit", "-2"], "run-1", "--backoff-limit"),
    (["--memory", "lots"], "run-1", "--memory"),
    (["--workers", "3"], "run-1", "train.global_batch_size"),  # 3 x 8 does not divide 64
    ([], "r" * 48, "run.name"),
    ([], "1st-run", "run.name"),
])
def test_submit_refuses_what_a_cluster_refuses(tmp_path, args, name, where):
    r = submit(tmp_path, *args, name=name)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert where in r.stderr and "fix:" in r.stderr and r.stdout == "", r.stderr


def test_valid_submit_renders_integers_and_a_short_name(tmp_path):
    r = submit(tmp_path, "--workers", "4", "--gpus-per-pod", "2", "--grace-period", "1209600", name="R" * 47)
    assert r.returncode == 0, r.stderr
    config_map, job = list(yaml.safe_load_all(r.stdout))
    assert job["metadata"]["name"] == "r" * 47
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 1209600
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == str(1209600 - 15)
    assert yaml.safe_load(config_map["data"]["config.yaml"])["scaling"]["num_workers"] == 8
