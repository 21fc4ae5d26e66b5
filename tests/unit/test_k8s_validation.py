"""`distil k8s submit` renders the Helm chart and refuses what a cluster would refuse, before
anything is sent: flags, names (KubeRay's RayJob rule), the batch split over the GPUs, what the
chart refuses. Rendered with --dry-run; no Kubernetes API server can run on these machines
(tests/integration/test_k8s_commands.py talks to an emulator of one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def submit(tmp_path, *args: str, name: str = "run-1", env: dict | None = None) -> subprocess.CompletedProcess:
    cfg = {
        "run": {"name": name},
        "teacher": {"name_or_path": "bert-base-uncased"},
        "student": {"layers": [0, 2]},
        "data": {"sources": ["s3://b/corpus/"]},
        "train": {"max_steps": 10, "micro_batch_size": 8, "global_batch_size": 64},
        "storage": {"uri": "s3://b/runs"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "distil.cli",
            "k8s",
            "submit",
            "--config",
            str(path),
            "--image",
            "img:1",
            "--dry-run",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.parametrize(
    "args, name, where",
    [
        (["--workers", "-1"], "run-1", "--workers"),
        (["--workers", "0"], "run-1", "--workers"),
        (["--gpus-per-pod", "0"], "run-1", "--gpus-per-pod"),
        (["--grace-period", "5"], "run-1", "--grace-period"),
        (["--backoff-limit", "-2"], "run-1", "--backoff-limit"),
        (["--memory", "lots"], "run-1", "--memory"),
        (["--workers", "3"], "run-1", "train.global_batch_size"),  # 3 x 8 does not divide 64
        (["--workers", "4", "--min-workers", "5"], "run-1", "--min-workers"),
        (["--workers", "4", "--min-workers", "0"], "run-1", "--min-workers"),
        (["--workers", "4", "--min-workers", "2"], "run-1", "worker counts 2..4 an elastic run may have: 3"),
        (["--queue", "Bad_Queue"], "run-1", "/kueue/queueName"),
        ([], "r" * 48, "run.name"),
        ([], "1st-run", "run.name"),
    ],
)
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


def test_submit_renders_what_helm_install_renders(tmp_path):
    """One source for the pod spec: the RayJob `distil k8s submit` makes from its flags is the
    one `helm install` makes from the values a user would write for the same cluster shape;
    only the managed-by label differs (no Helm release owns submitted objects)."""
    from tests.unit.test_helm_chart import render, validate

    r = submit(
        tmp_path,
        "--workers",
        "2",
        "--gpus-per-pod",
        "4",
        "--cpu",
        "12",
        "--memory",
        "64Gi",
        "--shm-size",
        "8Gi",
        "--credentials-secret",
        "s3-creds",
        "--backoff-limit",
        "5",
        "--grace-period",
        "600",
        "-n",
        "ml",
    )
    assert r.returncode == 0, r.stderr
    submitted = {d["kind"]: d for d in yaml.safe_load_all(r.stdout)}
    validate(list(submitted.values()))  # the KubeRay CRD schema and kubernetes-validate
    values = {
        "fullnameOverride": "run-1",
        "image": {"repository": "img", "tag": "1"},
        "serviceAccount": {"create": False},
        "storage": {"credentialsSecret": "s3-creds"},
        "job": {"backoffLimit": 5},
        "terminationGracePeriodSeconds": 600,
        "workerGroups": [
            {
                "name": "gpu",
                "replicas": 2,
                "gpusPerPod": 4,
                "shmSize": "8Gi",
                "resources": {"requests": {"cpu": "12", "memory": "64Gi"}, "limits": {"cpu": "12", "memory": "64Gi"}},
            }
        ],
    }
    (tmp_path / "my-values.yaml").write_text(yaml.safe_dump(values))
    installed = {d["kind"]: d for d in render("-f", str(tmp_path / "my-values.yaml"), "--set", "config.run.name=run-1")}
    job, helm_job = submitted["RayJob"], installed["RayJob"]
    # (the release is named `rel` in render(); the chart names objects after fullnameOverride)
    assert yaml.safe_dump(job["spec"]["rayClusterSpec"]).replace(
        "managed-by: distil", "managed-by: Helm"
    ) == yaml.safe_dump(helm_job["spec"]["rayClusterSpec"]).replace("instance: rel", "instance: run-1")
    assert job["spec"]["entrypoint"] == helm_job["spec"]["entrypoint"] and job["spec"]["backoffLimit"] == 5
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "12", "memory": "64Gi", "nvidia.com/gpu": 4}
    assert worker["terminationGracePeriodSeconds"] == 600 and worker["serviceAccountName"] == "default"
    mounted = yaml.safe_load(submitted["ConfigMap"]["data"]["config.yaml"])
    from distil.config.schema import DistilConfig

    cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
    cfg["scaling"] = {"num_workers": 8, "use_gpu": True, "gpus_per_worker": 1}
    assert DistilConfig.model_validate(mounted) == DistilConfig.model_validate(cfg)  # the config as submitted


def test_submit_without_helm_or_refused_by_the_chart_is_one_message(tmp_path):
    r = submit(tmp_path, env={"DISTIL_HELM": str(tmp_path / "no-helm")})
    assert r.returncode == 2 and "is not a helm program" in r.stderr and "DISTIL_HELM" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distil.cli",
            "k8s",
            "submit",
            "--config",
            str(tmp_path / "c.yaml"),
            "--image",
            ":1",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "the distil-run chart refuses" in r.stderr and "image" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_the_wheel_carries_the_chart(tmp_path):
    """An installed distil-run (not a source tree) still has the chart `submit` renders."""
    import zipfile

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("distil_run-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    chart = ROOT / "helm" / "distil-run"
    expected = {f"distil/chart/{p.relative_to(chart).as_posix()}" for p in chart.rglob("*") if p.is_file()}
    assert expected <= names and "distil/chart/templates/_helpers.tpl" in names
    assert not any(n.startswith("bench/") for n in names)  # benchmarks stay in the source tree


def test_an_elastic_submit_on_kueue_renders_the_chart_s_range_queue_and_budget(tmp_path):
    """`distil k8s submit` gets issue 28's chart values from its flags: 2 to 4 pods of 2 GPUs are
    scaling.num_workers [4, 8]. Every count from 4 to 8 is checked (not only the even ones whole
    pods give), so the global batch is 6720 = 8 x lcm(4..8) instead of 64."""
    r = submit(
        tmp_path,
        "--workers",
        "4",
        "--gpus-per-pod",
        "2",
        "--min-workers",
        "2",
        "--queue",
        "team-a",
        "--priority-class",
        "high",
        "--disruption-budget",
        "--set",
        "train.global_batch_size=6720",
    )
    assert r.returncode == 0, r.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(r.stdout)}
    assert yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["scaling"]["num_workers"] == [4, 8]
    job = docs["RayJob"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 2, 4)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"] == "true"
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
