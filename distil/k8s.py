"""`distil k8s`: runs on a Kubernetes cluster with the KubeRay operator, without Helm.

    distil k8s submit --config C --image IMG [--workers N --gpus-per-pod G ...]   ConfigMap + RayJob
    distil k8s status RUN                      RayJob, RayCluster and pod state, latest checkpoint
    distil k8s resume RUN [--workers N]        re-create a RayJob that ended without finishing

`submit` renders the packaged Helm chart (helm/distil-run, with `helm template`) from values
built from its flags, then creates the objects with the kubernetes client: the pod spec has
one source, the chart, whether a run is installed with Helm or submitted by `distil`. The
RayJob is named after the run (`run.name`, or the derived name), so a re-created job resumes
from that run's latest checkpoint in storage; every object is labelled `distil-run/run`, which
`status` and `resume` also find on a Helm-installed run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from distil.config import DistilConfig
from distil.errors import UserError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CONFIG_PATH = "/etc/distil/config.yaml"
RUN_LABEL = "distil-run/run"  # on every object of a run, from `distil k8s submit` and from the Helm chart
ENDED = {"Failed", "Complete"}  # jobDeploymentStatus values after which KubeRay does nothing more


MAX_RAYJOB_NAME = 47  # KubeRay: a RayCluster name is at most 53 characters, and a RayJob's gets 6 more
# A Kubernetes quantity without a sign (the chart's values.schema.json has the same pattern).
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]i?)?$")
# The API's integer fields: int32 (replicas, backoffLimit), and int64 ones (terminationGracePeriodSeconds)
# up to the largest whole number Helm's float64 arithmetic holds exactly (as the chart's schema says).
INT32_MAX, INT64_SAFE_MAX = 2**31 - 1, 2**53 - 1


def k8s_name(run: str) -> str:
    """The RayJob name of a run: the run name in lowercase with '-' for other characters, a
    DNS-1035 label of at most 47 characters as KubeRay requires. Never truncated: two runs
    would then share one job."""
    name = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_RAYJOB_NAME:
        raise UserError(f"run name {run!r} gives the RayJob name {name!r}, which is not a DNS-1035 label of at most "
                        f"{MAX_RAYJOB_NAME} characters starting with a letter (KubeRay's rule)", where="run.name",
                        fix=f"set run.name to a shorter name that starts with a letter, e.g. --set run.name={(name.lstrip('0123456789-') or 'run')[:30].rstrip('-')}")
    return name


def check_submit_flags(workers: int, gpus_per_pod: int, cpu: str, memory: str, shm_size: str, backoff_limit: int,
                       grace_period: int) -> None:
    """What `distil k8s submit` would otherwise render into objects a cluster refuses."""
    for flag, value, least, most in (("--workers", workers, 1, INT32_MAX), ("--gpus-per-pod", gpus_per_pod, 1, INT32_MAX),
                                     ("--backoff-limit", backoff_limit, 0, INT32_MAX),
                                     ("--grace-period", grace_period, 30, INT64_SAFE_MAX)):
        if value < least:
            why = " (the workers need time to checkpoint after SIGTERM)" if flag == "--grace-period" else ""
            raise UserError(f"{flag} {value}: must be at least {least}{why}", where=flag, fix=f"give {flag} {least} or more")
        if value > most:
            raise UserError(f"{flag} {value}: more than the Kubernetes field holds ({most:,})", where=flag,
                            fix=f"give {flag} {most} or less")
    for flag, value in (("--cpu", cpu), ("--memory", memory), ("--shm-size", shm_size)):
        if not QUANTITY.match(str(value)):
            raise UserError(f"{flag} {value!r} is not a Kubernetes quantity", where=flag, fix="write e.g. 8, 500m, 48Gi")


def clients(kubeconfig: str | None = None, context: str | None = None):
    """(CoreV1Api, CustomObjectsApi, ApiextensionsV1Api) from a kubeconfig or the in-cluster account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except Exception as kube_error:  # no kubeconfig: maybe inside a pod
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise UserError(f"no Kubernetes configuration: {str(kube_error).splitlines()[0]}", where="--kubeconfig",
                            fix="set KUBECONFIG or --kubeconfig (and --context), or run inside the cluster") from None
    return client.CoreV1Api(), client.CustomObjectsApi(), client.ApiextensionsV1Api()


@contextlib.contextmanager
def _api_errors(action: str):
    """The API server's refusals and unreachable servers as one clear message."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as e:
        raise UserError(f"{action}: the API server answered {e.status} {e.reason}",
                        fix="check the namespace, your permissions and the cluster") from None
    except HTTPError as e:
        raise UserError(f"{action}: cannot reach the API server ({type(e).__name__})",
                        fix="check the kubeconfig's server and your network") from None


def require_kuberay(ext) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}", _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            raise UserError("the KubeRay CRDs (rayjobs.ray.io) are not installed in this cluster",
                            fix="install the KubeRay operator: see k8s/README.md") from None
        raise


def chart_dir() -> Path:
    """The Helm chart this distil-run ships: helm/distil-run (`distil/chart` links to it in a
    source tree; a built wheel holds a copy there)."""
    return Path(__file__).resolve().with_name("chart")


def helm_binary() -> str:
    """helm v3: $DISTIL_HELM, the one beside this Python (`make setup` puts it in .venv/bin), or PATH's."""
    beside = Path(sys.executable).with_name("helm")
    found = os.environ.get("DISTIL_HELM") or (str(beside) if beside.is_file() else None) or shutil.which("helm")
    if not found or not Path(found).is_file():
        raise UserError(f"distil k8s submit renders the distil-run Helm chart with helm v3, and {found or 'none'} is not a "
                        "helm program", where="DISTIL_HELM" if os.environ.get("DISTIL_HELM") else "helm",
                        fix="install helm v3 (https://helm.sh/docs/intro/install/; `make setup` puts one in .venv/bin) "
                            "or set DISTIL_HELM to its path")
    return found


def submit_values(cfg: DistilConfig, image: str, workers: int, gpus_per_pod: int, cpu: str, memory: str, shm_size: str,
                  credentials_secret: str | None, backoff_limit: int, grace_period: int,
                  service_account: str | None = None) -> dict:
    """The chart's values for `distil k8s submit`'s flags: what a user would write in
    my-values.yaml for `helm install`. Objects are named after the run (fullnameOverride)."""
    if not cfg.storage_root().is_s3:
        raise UserError(f"storage.uri is {cfg.storage.uri!r}: pods lose their disks on preemption", where="storage.uri",
                        fix="use object storage: s3://bucket/prefix (with storage.endpoint_url for MinIO/Ceph/R2)")
    check_submit_flags(workers, gpus_per_pod, cpu, memory, shm_size, backoff_limit, grace_period)
    cfg.check_batch_split(workers * gpus_per_pod)
    run = cfg.run_name()
    # run.name written out (the chart labels every object with it); `scaling` as the chart sets it.
    config = cfg.model_dump(mode="json")
    config["run"]["name"] = run
    config["scaling"].update(num_workers=workers * gpus_per_pod, use_gpu=True, gpus_per_worker=1)
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return {
        "mode": "job", "fullnameOverride": k8s_name(run), "config": config,
        "image": {"repository": repository, "tag": tag},
        "serviceAccount": {"create": False, "name": service_account or ""},
        "storage": {"credentialsSecret": credentials_secret or ""},
        "job": {"backoffLimit": backoff_limit},
        "terminationGracePeriodSeconds": grace_period,
        "workerGroups": [{"name": "gpu", "replicas": workers, "gpusPerPod": gpus_per_pod, "shmSize": shm_size,
                          "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}}],
    }


def render_chart(values: dict, namespace: str, chart: Path | None = None) -> list[dict]:
    """`helm template` of the chart with these values: the objects `helm install` would create
    (one source for the pod spec), labelled as made by distil, in `namespace`. What the chart
    refuses (its schema, its checks) comes back as one UserError."""
    import tempfile

    import yaml

    helm = helm_binary()
    chart = chart or chart_dir()
    if not (chart / "Chart.yaml").is_file():
        raise UserError(f"no Helm chart at {chart}", where="--chart", fix="give the distil-run chart's folder (helm/distil-run)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="distil-values-") as f:
        yaml.safe_dump(values, f, sort_keys=False)
        f.flush()
        r = subprocess.run([helm, "template", values["fullnameOverride"], str(chart), "--namespace", namespace, "-f", f.name],
                           capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise UserError(f"the distil-run chart refuses these settings: {_helm_error(r.stderr)}", where="distil k8s submit",
                        fix="change the flag or config key it names")
    objects = [d for d in yaml.safe_load_all(r.stdout) if d]
    for obj in objects:
        obj["metadata"]["namespace"] = namespace
        _relabel(obj)
    return objects


def _helm_error(stderr: str) -> str:
    """helm's refusal in one line: a chart check's message, or the schema's findings."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip() and not line.startswith("WARNING")]
    text = "; ".join(lines).removeprefix("Error: ")
    return re.sub(r"execution error at \([^)]*\): ", "", text)


def _relabel(node) -> None:
    """managed-by: distil, not Helm: these objects belong to no Helm release (`helm list` does
    not show them, `helm upgrade` does not own them)."""
    if isinstance(node, dict):
        if node.get("app.kubernetes.io/managed-by") == "Helm":
            node["app.kubernetes.io/managed-by"] = "distil"
        for v in node.values():
            _relabel(v)
    elif isinstance(node, list):
        for v in node:
            _relabel(v)


def submit(api, objects: list[dict]) -> str:
    """Create the rendered objects (ConfigMap, RayJob; a ServiceAccount if the values make one);
    a RayJob of that name must not exist yet. Returns its name."""
    from kubernetes.client.exceptions import ApiException

    core, custom, ext = api
    job = next(o for o in objects if o["kind"] == "RayJob")
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    create = {"ConfigMap": (core.create_namespaced_config_map, core.replace_namespaced_config_map),
              "ServiceAccount": (core.create_namespaced_service_account, core.replace_namespaced_service_account)}
    with _api_errors(f"submitting {name}"):
        require_kuberay(ext)
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise UserError(f"RayJob {namespace}/{name} exists", where="run.name",
                            fix=f"follow it with `distil k8s status {name}`, or `distil k8s resume {name}` once it has ended")
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
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, label_selector=f"{RUN_LABEL}={name}")["items"]
    found = [j for j in listed if (j["metadata"].get("labels") or {}).get(RUN_LABEL) == name]  # (a server may not filter)
    if len(found) > 1:
        names = ", ".join(sorted(j["metadata"]["name"] for j in found))
        raise UserError(f"RayJobs {names} in {namespace} are all labelled {RUN_LABEL}={name}", where="run",
                        fix="delete the ones that are not this run (helm uninstall RELEASE), then try again")
    if not found:
        raise UserError(f"no RayJob {namespace}/{name}, and none labelled {RUN_LABEL}={name}",
                        fix="check the run name and --namespace, or `distil k8s submit` it (or `helm install` it)")
    return found[0]


def status(api, namespace: str, run: str) -> dict:
    """The RayJob's state, its cluster's, its pods' phases, and the latest complete checkpoint."""
    import yaml

    core, custom, ext = api
    with _api_errors(f"reading {k8s_name(run)}"):
        job = _read_job(custom, ext, namespace, run)
        name = job["metadata"]["name"]
        st = job.get("status", {})
        cluster = st.get("rayClusterName")
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster}").items if cluster else []
        cm = core.read_namespaced_config_map(f"{name}-config", namespace)
    out = {"name": name, "namespace": namespace, "job_status": st.get("jobStatus"),
           "deployment_status": st.get("jobDeploymentStatus"), "failed": st.get("failed", 0),
           "succeeded": st.get("succeeded", 0), "message": st.get("message"), "cluster": cluster,
           "cluster_state": (st.get("rayClusterStatus") or {}).get("state"),
           "pods": {p.metadata.name: p.status.phase for p in pods
                    if (p.metadata.labels or {}).get("ray.io/cluster") == cluster}}
    cfg = DistilConfig.model_validate(yaml.safe_load(cm.data["config.yaml"]))
    out["checkpoint"] = _latest_checkpoint(cfg)
    return out


def _latest_checkpoint(cfg: DistilConfig) -> dict | None:
    from distil.catalog import list_checkpoints

    run = cfg.run_storage()
    uri = run.uri
    try:
        done = [c for c in list_checkpoints(run) if c.complete]
    except UserError as e:
        return {"uri": uri, "error": str(e)}
    return {"uri": uri, "step": done[-1].step if done else None, "tokens": done[-1].meta.get("tokens") if done else None}


def resume(api, namespace: str, run: str, wait_s: float = 120.0, workers: int | None = None) -> str:
    """Delete an ended RayJob and create it again with the same spec: it resumes from storage.
    `workers`: worker pods of the new job (spot capacity came back smaller or larger); the run
    continues from its checkpoint with the ZeRO-2 state re-partitioned (distil/reshard.py)."""
    from kubernetes.client.exceptions import ApiException

    core, custom, ext = api
    with _api_errors(f"resuming {k8s_name(run)}"):
        job = _read_job(custom, ext, namespace, run)
        name = job["metadata"]["name"]
        state = job.get("status", {}).get("jobDeploymentStatus")
        if state not in ENDED:
            raise UserError(f"RayJob {name} is {state or 'starting'}, not ended", fix="wait for it to end, or follow it with `distil k8s status`")
        spec = job["spec"]
        if workers is not None:
            spec = _with_workers(spec, workers, core.read_namespaced_config_map(f"{name}-config", namespace).data["config.yaml"])
        meta = job["metadata"]
        fresh = {"apiVersion": job["apiVersion"], "kind": job["kind"], "spec": spec,
                 "metadata": {"name": name, "namespace": namespace, "labels": meta.get("labels", {}),
                              "annotations": {**(meta.get("annotations") or {}),
                                              "distil-run/resumed-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}}
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
                raise UserError(f"RayJob {name} is still being deleted after {wait_s:.0f}s", fix="run resume again shortly")
            time.sleep(1.0)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, fresh)
    return name


def _with_workers(spec: dict, workers: int, config_yaml: str) -> dict:
    """The RayJob spec with `workers` worker pods, and the training worker count to match (a
    `--set` on the entrypoint: the ConfigMap keeps the config as submitted)."""
    import copy

    import yaml

    if not 1 <= workers <= INT32_MAX:
        raise UserError(f"--workers {workers}: a run needs at least one worker pod, and at most {INT32_MAX:,} (int32 replicas)",
                        where="--workers")
    spec = copy.deepcopy(spec)
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group.get("rayStartParams", {}).get("num-gpus", "1"))
    ranks = workers * gpus
    t = DistilConfig.model_validate(yaml.safe_load(config_yaml)).train
    if t.global_batch_size % (t.micro_batch_size * ranks):
        raise UserError(f"--workers {workers}: {ranks} training workers x micro_batch_size {t.micro_batch_size} does not divide "
                        f"global_batch_size {t.global_batch_size}", where="--workers",
                        fix="pick a worker count for which it does (the global batch stays the same across a resume)")
    group.update(replicas=workers, minReplicas=workers, maxReplicas=workers)
    entry = re.sub(r" --set scaling\.num_workers=\d+", "", spec["entrypoint"])
    spec["entrypoint"] = f"{entry} --set scaling.num_workers={ranks}"
    return spec
