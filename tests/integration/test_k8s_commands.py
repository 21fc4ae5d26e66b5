"""`distil k8s submit/status/resume` against an in-process Kubernetes API emulator (kmock's
KubernetesEmulator over HTTP on loopback), driven through the real `kubernetes` client and a
kubeconfig. No Kubernetes API server can run on these machines; the emulator stores objects
as JSON and does not run the KubeRay operator, so the tests set the RayJob's status
themselves, as the operator would."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid

import boto3
import pytest
import yaml

from tests.conftest import ROOT, base_config, fake_checkpoint, write_config
from tests.unit.test_helm_chart import crd_validator

NS = "ml"


class Emulator:
    """kmock's KubernetesEmulator and its HTTP server, on an event loop in a thread."""

    def __init__(self):
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the emulator did not start"

    async def _main(self):
        import kmock

        self.stop_event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with kmock.KubernetesEmulator() as emu, kmock.Server(emu) as server:
            self.emu, self.url = emu, str(server.url).rstrip("/")
            self.ready.set()
            await self.stop_event.wait()

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture()
def cluster(tmp_path):
    emu = Emulator()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emu",
                "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
            }
        )
    )
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    yield (
        emu,
        kubeconfig,
        client.CoreV1Api(api_client),
        client.CustomObjectsApi(api_client),
        client.ApiextensionsV1Api(api_client),
    )
    emu.stop()


def k8s(kubeconfig, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distil.cli", "k8s", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def install_kuberay_crds(ext) -> None:
    """What installing the operator registers (only the CRD's identity: the emulator has no schemas)."""
    ext.create_custom_resource_definition(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "rayjobs.ray.io"},
            "spec": {
                "group": "ray.io",
                "scope": "Namespaced",
                "names": {"plural": "rayjobs", "kind": "RayJob"},
                "versions": [{"name": "v1", "served": True, "storage": True}],
            },
        },
        _preload_content=False,
    )


@pytest.fixture()
def run_config(tmp_path, teacher_dir, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"k8s-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    cfg = base_config(
        teacher_dir,
        tmp_path,
        run={"name": "Distil_Run.1"},
        storage={"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
    )
    return write_config(tmp_path / "c.yaml", cfg), s3, bucket


def test_no_kubeconfig_is_one_clear_error(tmp_path):
    r = k8s(tmp_path / "missing-kubeconfig", "status", "x")
    assert r.returncode == 2 and "no Kubernetes configuration" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_kuberay_crds(cluster, run_config):
    _, kubeconfig, *_ = cluster
    r = k8s(kubeconfig, "submit", "-c", str(run_config[0]), "--image", "img:1", "-n", NS)
    assert r.returncode == 2 and "KubeRay CRDs" in r.stderr and "k8s/README.md" in r.stderr, r.stderr


def test_submit_status_resume(tmp_path, cluster, run_config):
    emu, kubeconfig, core, custom, ext = cluster
    path, s3, bucket = run_config
    install_kuberay_crds(ext)
    r = k8s(
        kubeconfig,
        "submit",
        "-c",
        str(path),
        "--image",
        "img:1",
        "-n",
        NS,
        "--workers",
        "2",
        "--gpus-per-pod",
        "4",
        "--credentials-secret",
        "distil-s3",
        "--backoff-limit",
        "5",
        "--set",
        "train.global_batch_size=32",
        "--disruption-budget",
    )
    assert r.returncode == 0, r.stderr
    from kubernetes import client

    pdb = client.PolicyV1Api(core.api_client).read_namespaced_pod_disruption_budget("distil-run-1-workers", NS)
    assert (
        pdb.spec.max_unavailable == 1 and pdb.spec.selector.match_labels["app.kubernetes.io/component"] == "ray-worker"
    )
    job = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1")
    assert not list(crd_validator("RayJob").iter_errors(job))  # the real ray.io/v1 schema, unknown fields as errors
    spec = job["spec"]
    assert spec["entrypoint"] == "python jobs/distill.py --config /etc/distil/config.yaml" and spec["backoffLimit"] == 5
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (
        worker["replicas"] == 2
        and worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    )
    assert worker["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][:3] == [
        "python",
        "-m",
        "distil.runs.preempt",
    ]
    env = {e["name"]: e for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "distil-s3"
    cm = core.read_namespaced_config_map("distil-run-1-config", NS)
    mounted = yaml.safe_load(cm.data["config.yaml"])
    assert mounted["scaling"]["num_workers"] == 8 and mounted["scaling"]["use_gpu"] is True
    assert "testing" not in cm.data["config.yaml"]  # credentials stay in the Secret
    again = k8s(kubeconfig, "submit", "-c", str(path), "--image", "img:1", "-n", NS)
    assert again.returncode == 2 and "exists" in again.stderr
    dry = k8s(kubeconfig, "submit", "-c", str(path), "--image", "img:1", "-n", NS, "--dry-run")
    assert (
        dry.returncode == 0 and "kind: RayJob" in dry.stdout and "kind: Pod" not in dry.stdout
    )  # (the chart's `helm test` pod)

    # What the operator would report, a pod of the cluster, and a checkpoint in storage.
    custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        NS,
        "rayjobs",
        "distil-run-1",
        {
            "status": {
                "jobStatus": "RUNNING",
                "jobDeploymentStatus": "Running",
                "rayClusterName": "distil-run-1-abcde",
                "rayClusterStatus": {"state": "ready"},
            }
        },
    )
    core.create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "distil-run-1-abcde-gpu-worker-0",
                "labels": {"ray.io/cluster": "distil-run-1-abcde", "app.kubernetes.io/component": "ray-worker"},
            },
            "spec": {
                "containers": [
                    {"name": "ray-worker", "image": "img:1", "resources": {"limits": {"nvidia.com/gpu": "4"}}}
                ]
            },
            "status": {"phase": "Running"},
        },
    )
    ckpt = fake_checkpoint(tmp_path / "ckpt", "step_00000040", {"a.pt": b"12345"})
    for f in ckpt.rglob("*"):
        s3.upload_file(str(f), bucket, f"runs/Distil_Run.1/step_00000040/{f.relative_to(ckpt).as_posix()}")
    st = k8s(kubeconfig, "status", "Distil_Run.1", "-n", NS, "--json")
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    assert report["job_status"] == "RUNNING" and report["cluster_state"] == "ready"
    assert report["pods"] == {"distil-run-1-abcde-gpu-worker-0": "Running"}
    assert report["checkpoint"]["step"] == 40 and report["checkpoint"]["tokens"] == 10
    assert report["workers"] == {"configured": "8", "up": 4}  # one of the two 4-GPU pods is running

    busy = k8s(kubeconfig, "resume", "Distil_Run.1", "-n", NS)
    assert busy.returncode == 2 and "not ended" in busy.stderr
    custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        NS,
        "rayjobs",
        "distil-run-1",
        {"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "failed": 6}},
    )
    r = k8s(kubeconfig, "resume", "Distil_Run.1", "-n", NS)
    assert r.returncode == 0, r.stderr
    fresh = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1")
    assert "status" not in fresh and fresh["spec"] == spec  # the same job, without its old state
    assert "distil-run/resumed-at" in fresh["metadata"]["annotations"]

    # Capacity came back smaller: 1 pod of 4 GPUs. 3 pods x 4 = 12 ranks do not divide the global batch.
    set_status = {"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}
    custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1", set_status)
    bad = k8s(kubeconfig, "resume", "Distil_Run.1", "-n", NS, "--workers", "3")
    assert bad.returncode == 2 and "does not divide global_batch_size" in bad.stderr, bad.stderr
    assert "status" in custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1")  # untouched
    for _ in range(2):  # twice: the entrypoint carries one worker count, the latest
        r = k8s(kubeconfig, "resume", "Distil_Run.1", "-n", NS, "--workers", "1")
        assert r.returncode == 0, r.stderr
        custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1", set_status)
    smaller = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "distil-run-1")["spec"]
    group = smaller["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 1)
    assert (
        smaller["entrypoint"] == "python jobs/distill.py --config /etc/distil/config.yaml --set scaling.num_workers=4"
    )
    assert not list(crd_validator("RayJob").iter_errors({**fresh, "spec": smaller}))


def test_status_and_resume_find_a_helm_installed_run(cluster, run_config):
    """The chart names its objects after the release (`rel-distil-run`), not the run; it labels
    them with the run, and `distil k8s status/resume RUN` find the RayJob by that label. (No
    Helm release can be installed without an API server: the objects are `helm template`'s,
    created as `helm install` would create them.)"""
    from tests.unit.test_helm_chart import render

    emu, kubeconfig, core, custom, ext = cluster
    _, s3, bucket = run_config
    install_kuberay_crds(ext)
    objects = render(
        "--namespace",
        NS,
        "--set",
        "config.run.name=Distil_Run.1",
        "--set",
        f"config.storage.uri=s3://{bucket}/runs",
        "--set",
        "config.storage.endpoint_url=http://127.0.0.1:9",
    )
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            core.create_namespaced_config_map(NS, obj)
        elif obj["kind"] == "RayJob":
            custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", obj)
    gone = k8s(kubeconfig, "status", "other-run", "-n", NS)  # a run that is not there
    assert gone.returncode == 2 and "none labelled distil-run/run=other-run" in gone.stderr, gone.stderr
    st = k8s(kubeconfig, "status", "Distil_Run.1", "-n", NS, "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["name"] == "rel-distil-run"
    custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        NS,
        "rayjobs",
        "rel-distil-run",
        {"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}},
    )
    r = k8s(kubeconfig, "resume", "Distil_Run.1", "-n", NS)
    assert r.returncode == 0, r.stderr
    fresh = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "rel-distil-run")
    assert "status" not in fresh and fresh["metadata"]["labels"]["distil-run/run"] == "distil-run-1"
    assert fresh["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # still the release's object


def test_submit_refuses_local_storage(cluster, run_config, tmp_path):
    _, kubeconfig, *_ = cluster
    r = k8s(kubeconfig, "submit", "-c", str(run_config[0]), "--set", f"storage.uri={tmp_path}", "--image", "img:1")
    assert r.returncode == 2 and "s3://" in r.stderr
