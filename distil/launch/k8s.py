"""`distil k8s`: runs on a Kubernetes cluster with the KubeRay operator, without Helm.

    distil k8s submit --config C --image IMG [--workers N --gpus-per-pod G ...]   ConfigMap + RayJob
    distil k8s status RUN                      RayJob, RayCluster and pod state, latest checkpoint
    distil k8s resume RUN [--workers N]        re-create a RayJob that ended without finishing

`submit` renders the packaged Helm chart (distil/launch/chart.py) from values built from its
flags, then creates the objects with the kubernetes client: the pod spec has one source, the
chart, whether a run is installed with Helm or submitted by `distil`. The RayJob is named after
the run (`run.name`, or the derived name), so a re-created job resumes
from that run's latest checkpoint in storage; every object is labelled `distil-run/run`, which
`status` and `resume` also find on a Helm-installed run.
"""

from __future__ import annotations

# Imports inside functions: the kubernetes client only for the commands that talk to a cluster, the
# checkpoint catalog (torch) only for status.
import contextlib
import copy
import re
import time

import yaml

from distil.config.schema import DistilConfig
from distil.errors import UserError
from distil.launch.chart import INT32_MAX, k8s_name

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CONFIG_PATH = "/etc/distil/config.yaml"
RUN_LABEL = "distil-run/run"  # on every object of a run, from `distil k8s submit` and from the Helm chart
ENDED = {"Failed", "Complete"}  # jobDeploymentStatus values after which KubeRay does nothing more


def clients(kubeconfig: str | None = None, context: str | None = None):
    """(CoreV1Api, CustomObjectsApi, ApiextensionsV1Api) from a kubeconfig or the in-cluster account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except Exception as kube_error:  # no kubeconfig: maybe inside a pod
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise UserError(
                f"no Kubernetes configuration: {str(kube_error).splitlines()[0]}",
                where="--kubeconfig",
                fix="set KUBECONFIG or --kubeconfig (and --context), or run inside the cluster",
            ) from None
    return client.CoreV1Api(), client.CustomObjectsApi(), client.ApiextensionsV1Api()


@contextlib.contextmanager
def _api_errors(action: str):
    """The API server's refusals and unreachable servers as one clear message."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as e:
        raise UserError(
            f"{action}: the API server answered {e.status} {e.reason}",
            fix="check the namespace, your permissions and the cluster",
        ) from None
    except HTTPError as e:
        raise UserError(
            f"{action}: cannot reach the API server ({type(e).__name__})",
            fix="check the kubeconfig's server and your network",
        ) from None


def require_kuberay(ext) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}", _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            raise UserError(
                "the KubeRay CRDs (rayjobs.ray.io) are not installed in this cluster",
                fix="install the KubeRay operator: see k8s/README.md",
            ) from None
        raise


def submit(api, objects: list[dict]) -> str:
    """Create the rendered objects (ConfigMap, RayJob; a ServiceAccount and a PodDisruptionBudget
    if the values make them); a RayJob of that name must not exist yet. Returns its name."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, custom, ext = api
    job = next(o for o in objects if o["kind"] == "RayJob")
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    policy = client.PolicyV1Api(core.api_client)
    create = {
        "ConfigMap": (core.create_namespaced_config_map, core.replace_namespaced_config_map),
        "ServiceAccount": (core.create_namespaced_service_account, core.replace_namespaced_service_account),
        "PodDisruptionBudget": (
            policy.create_namespaced_pod_disruption_budget,
            policy.replace_namespaced_pod_disruption_budget,
        ),
    }
    with _api_errors(f"submitting {name}"):
        require_kuberay(ext)
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise UserError(
                f"RayJob {namespace}/{name} exists",
                where="run.name",
                fix=f"follow it with `distil k8s status {name}`, or `distil k8s resume {name}` once it has ended",
            )
        except ApiException as e:
            if e.status != 404:
                raise
        for obj in objects:  # the RayJob last: it mounts the ConfigMap
            if obj["kind"] == "RayJob":
                continue
            make, replace = create[obj["kind"]]
            try:
                make(namespace, obj)
            except ApiException as e:
                if e.status != 409:
                    raise
                replace(obj["metadata"]["name"], namespace, obj)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    return name


def _read_job(custom, ext, namespace: str, run: str) -> dict:
    """The run's RayJob, after checking that KubeRay is installed: the one `distil k8s submit`
    named after the run, or the one a Helm release labelled with it (the chart names objects
    after the release). A clear error when there is none, or more than one."""
    from kubernetes.client.exceptions import ApiException

    require_kuberay(ext)
    name = k8s_name(run)
    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status != 404:
            raise
    listed = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"{RUN_LABEL}={name}"
    )["items"]
    found = [
        j for j in listed if (j["metadata"].get("labels") or {}).get(RUN_LABEL) == name
    ]  # (a server may not filter)
    if len(found) > 1:
        names = ", ".join(sorted(j["metadata"]["name"] for j in found))
        raise UserError(
            f"RayJobs {names} in {namespace} are all labelled {RUN_LABEL}={name}",
            where="run",
            fix="delete the ones that are not this run (helm uninstall RELEASE), then try again",
        )
    if not found:
        raise UserError(
            f"no RayJob {namespace}/{name}, and none labelled {RUN_LABEL}={name}",
            fix="check the run name and --namespace, or `distil k8s submit` it (or `helm install` it)",
        )
    return found[0]


def status(api, namespace: str, run: str) -> dict:
    """The RayJob's state, its cluster's, its pods' phases, and the latest complete checkpoint."""

    core, custom, ext = api
    with _api_errors(f"reading {k8s_name(run)}"):
        job = _read_job(custom, ext, namespace, run)
        name = job["metadata"]["name"]
        st = job.get("status", {})
        cluster = st.get("rayClusterName")
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster}").items if cluster else []
        cm = core.read_namespaced_config_map(f"{name}-config", namespace)
    out = {
        "name": name,
        "namespace": namespace,
        "job_status": st.get("jobStatus"),
        "deployment_status": st.get("jobDeploymentStatus"),
        "failed": st.get("failed", 0),
        "succeeded": st.get("succeeded", 0),
        "message": st.get("message"),
        "cluster": cluster,
        "cluster_state": (st.get("rayClusterStatus") or {}).get("state"),
        "pods": {
            p.metadata.name: p.status.phase for p in pods if (p.metadata.labels or {}).get("ray.io/cluster") == cluster
        },
    }
    cfg = DistilConfig.model_validate(yaml.safe_load(cm.data["config.yaml"]))
    out["workers"] = {"configured": _configured(cfg), "up": _gpu_workers_up(pods)}
    out["checkpoint"] = _latest_checkpoint(cfg)
    return out


def _configured(cfg: DistilConfig) -> str:
    s = cfg.scaling
    return f"{s.min_workers} to {s.max_workers} (elastic)" if s.elastic else str(s.num_workers)


def _gpu_workers_up(pods) -> int:
    """Training workers whose pods are Running: one per GPU of each running worker pod. An elastic
    run trains on these (a pod that came back joins at the run's next resize check)."""
    up = 0
    for p in pods:
        if (p.metadata.labels or {}).get("app.kubernetes.io/component") != "ray-worker" or p.status.phase != "Running":
            continue
        limits = (p.spec.containers[0].resources.limits or {}) if p.spec.containers[0].resources else {}
        up += int(limits.get("nvidia.com/gpu", 1))
    return up


def _latest_checkpoint(cfg: DistilConfig) -> dict | None:
    from distil.runs.catalog import list_checkpoints

    run = cfg.run_storage()
    uri = run.uri
    try:
        done = [c for c in list_checkpoints(run) if c.complete]
    except UserError as e:
        return {"uri": uri, "error": str(e)}
    return {
        "uri": uri,
        "step": done[-1].step if done else None,
        "tokens": done[-1].meta.get("tokens") if done else None,
    }


def resume(api, namespace: str, run: str, wait_s: float = 120.0, workers: int | None = None) -> str:
    """Delete an ended RayJob and create it again with the same spec: it resumes from storage.
    `workers`: worker pods of the new job (spot capacity came back smaller or larger); the run
    continues from its checkpoint with the ZeRO-2 state re-partitioned (distil/runs/reshard.py)."""
    from kubernetes.client.exceptions import ApiException

    core, custom, ext = api
    with _api_errors(f"resuming {k8s_name(run)}"):
        job = _read_job(custom, ext, namespace, run)
        name = job["metadata"]["name"]
        state = job.get("status", {}).get("jobDeploymentStatus")
        if state not in ENDED:
            raise UserError(
                f"RayJob {name} is {state or 'starting'}, not ended",
                fix="wait for it to end, or follow it with `distil k8s status`",
            )
        spec = job["spec"]
        if workers is not None:
            spec = _with_workers(
                spec, workers, core.read_namespaced_config_map(f"{name}-config", namespace).data["config.yaml"]
            )
        meta = job["metadata"]
        fresh = {
            "apiVersion": job["apiVersion"],
            "kind": job["kind"],
            "spec": spec,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": meta.get("labels", {}),
                "annotations": {
                    **(meta.get("annotations") or {}),
                    "distil-run/resumed-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            },
        }
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        deadline = time.monotonic() + wait_s
        while True:  # the old object (and its finalizers) must be gone before the name is free
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as e:
                if e.status == 404:
                    break
                raise
            if time.monotonic() > deadline:
                raise UserError(
                    f"RayJob {name} is still being deleted after {wait_s:.0f}s", fix="run resume again shortly"
                )
            time.sleep(1.0)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, fresh)
    return name


def _with_workers(spec: dict, workers: int, config_yaml: str) -> dict:
    """The RayJob spec with `workers` worker pods, and the training worker count to match (a
    `--set` on the entrypoint: the ConfigMap keeps the config as submitted)."""

    if not 1 <= workers <= INT32_MAX:
        raise UserError(
            f"--workers {workers}: a run needs at least one worker pod, and at most {INT32_MAX:,} (int32 replicas)",
            where="--workers",
        )
    spec = copy.deepcopy(spec)
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group.get("rayStartParams", {}).get("num-gpus", "1"))
    ranks = workers * gpus
    t = DistilConfig.model_validate(yaml.safe_load(config_yaml)).train
    if t.global_batch_size % (t.micro_batch_size * ranks):
        raise UserError(
            f"--workers {workers}: {ranks} training workers x micro_batch_size {t.micro_batch_size} does not divide "
            f"global_batch_size {t.global_batch_size}",
            where="--workers",
            fix="pick a worker count for which it does (the global batch stays the same across a resume)",
        )
    group.update(replicas=workers, minReplicas=workers, maxReplicas=workers)
    entry = re.sub(r" --set scaling\.num_workers=\d+", "", spec["entrypoint"])
    spec["entrypoint"] = f"{entry} --set scaling.num_workers={ranks}"
    return spec
