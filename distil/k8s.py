"""`distil k8s`: runs on a Kubernetes cluster with the KubeRay operator, without Helm.

    distil k8s submit --config C --image IMG [--workers N --gpus-per-pod G ...]   ConfigMap + RayJob
    distil k8s status RUN                      RayJob, RayCluster and pod state, latest checkpoint
    distil k8s resume RUN [--workers N]        re-create a RayJob that ended without finishing

The RayJob is named after the run (`run.name`, or the derived name), so a re-created job
resumes from that run's latest checkpoint in storage. The objects match what the Helm chart
renders (helm/distil-run): one training worker per GPU, S3 credentials only by secretKeyRef,
a memory-backed /dev/shm, non-root pods, a grace period for the checkpoint on SIGTERM.
"""

from __future__ import annotations

import contextlib
import re
import time

from distil.config import DistilConfig
from distil.errors import UserError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CONFIG_PATH = "/etc/distil/config.yaml"
RUN_LABEL = "distil-run/run"  # on every object of a run, from `distil k8s submit` and from the Helm chart
ENDED = {"Failed", "Complete"}  # jobDeploymentStatus values after which KubeRay does nothing more


MAX_RAYJOB_NAME = 47  # KubeRay: a RayCluster name is at most 53 characters, and a RayJob's gets 6 more
QUANTITY = re.compile(r"^[0-9.]+([eE][0-9]+|[numkMGTPE]i?)?$")


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
    for flag, value, least in (("--workers", workers, 1), ("--gpus-per-pod", gpus_per_pod, 1), ("--backoff-limit", backoff_limit, 0),
                               ("--grace-period", grace_period, 30)):
        if value < least:
            why = " (the workers need time to checkpoint after SIGTERM)" if flag == "--grace-period" else ""
            raise UserError(f"{flag} {value}: must be at least {least}{why}", where=flag, fix=f"give {flag} {least} or more")
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


def manifests(cfg: DistilConfig, namespace: str, image: str, workers: int, gpus_per_pod: int, cpu: str, memory: str,
              shm_size: str, credentials_secret: str | None, backoff_limit: int, grace_period: int,
              service_account: str | None = None) -> tuple[dict, dict]:
    """(ConfigMap, RayJob) for a run: `workers` pods with `gpus_per_pod` GPUs, one rank per GPU."""
    if not cfg.storage.uri.startswith("s3://"):
        raise UserError(f"storage.uri is {cfg.storage.uri!r}: pods lose their disks on preemption", where="storage.uri",
                        fix="use object storage: s3://bucket/prefix (with storage.endpoint_url for MinIO/Ceph/R2)")
    check_submit_flags(workers, gpus_per_pod, cpu, memory, shm_size, backoff_limit, grace_period)
    cfg.check_batch_split(workers * gpus_per_pod)
    run = cfg.run_name()
    name = k8s_name(run)
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={
        "num_workers": workers * gpus_per_pod, "use_gpu": True, "gpus_per_worker": 1.0})})
    labels = {"app.kubernetes.io/name": "distil-run", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/part-of": "distil-run", "app.kubernetes.io/managed-by": "distil", RUN_LABEL: name}
    env = [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "TORCH_EXTENSIONS_DIR", "value": "/tmp/torch_extensions"}]
    if credentials_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": credentials_secret, "key": k}}}
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]

    def pod(component: str, resources: dict, shm: str) -> dict:
        spec = {
            "terminationGracePeriodSeconds": grace_period,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": component, "image": image, "env": env, "resources": resources,
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                **({"lifecycle": {"preStop": {"exec": {"command": [  # checkpoint before SIGTERM: distil/preempt.py
                    "python", "-m", "distil.preempt", "--timeout", str(grace_period - 15)]}}}} if component == "ray-worker" else {}),
                "volumeMounts": [{"name": "distil-config", "mountPath": "/etc/distil", "readOnly": True},
                                 {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [{"name": "distil-config", "configMap": {"name": f"{name}-config"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
                        {"name": "tmp", "emptyDir": {}}],
        }
        if service_account:
            spec["serviceAccountName"] = service_account
        return {"metadata": {"labels": {**labels, "app.kubernetes.io/component": component}}, "spec": spec}

    worker_res = {"requests": {"cpu": cpu, "memory": memory},
                  "limits": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus_per_pod}}
    head_res = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": labels},
                  "data": {"config.yaml": cfg.to_yaml()}}
    job = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": f"python jobs/distill.py --config {CONFIG_PATH}",
            "submissionMode": "K8sJobMode",
            "backoffLimit": backoff_limit,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {"rayStartParams": {"num-gpus": "0"}, "template": pod("ray-head", head_res, "1Gi")},
                "workerGroupSpecs": [{"groupName": "gpu", "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                                      "rayStartParams": {"num-gpus": str(gpus_per_pod)},
                                      "template": pod("ray-worker", worker_res, shm_size)}],
            },
        },
    }
    return config_map, job


def submit(api, config_map: dict, job: dict) -> str:
    core, custom, ext = api
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    from kubernetes.client.exceptions import ApiException

    with _api_errors(f"submitting {name}"):
        require_kuberay(ext)
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise UserError(f"RayJob {namespace}/{name} exists", where="run.name",
                            fix=f"follow it with `distil k8s status {name}`, or `distil k8s resume {name}` once it has ended")
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            core.create_namespaced_config_map(namespace, config_map)
        except ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_config_map(config_map["metadata"]["name"], namespace, config_map)
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

    if workers < 1:
        raise UserError(f"--workers {workers}: a run needs at least one worker pod", where="--workers")
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
