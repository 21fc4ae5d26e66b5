"""The Helm chart as `distil k8s submit` renders it (helm/distil-run, with `helm template`): the
chart's values made from the command's flags and the run's config, checked first where a flag
is the cause (names KubeRay accepts, counts within the Kubernetes field that holds them,
quantities by Kubernetes' grammar), and the objects `helm install` would create. The pod spec
has one source, the chart, whether a run is installed with Helm or submitted by `distil`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from distil.config.schema import DistilConfig
from distil.errors import UserError

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
        raise UserError(
            f"run name {run!r} gives the RayJob name {name!r}, which is not a DNS-1035 label of at most "
            f"{MAX_RAYJOB_NAME} characters starting with a letter (KubeRay's rule)",
            where="run.name",
            fix=f"set run.name to a shorter name that starts with a letter, e.g. --set run.name={(name.lstrip('0123456789-') or 'run')[:30].rstrip('-')}",
        )
    return name


def check_submit_flags(
    workers: int, gpus_per_pod: int, cpu: str, memory: str, shm_size: str, backoff_limit: int, grace_period: int
) -> None:
    """What `distil k8s submit` would otherwise render into objects a cluster refuses."""
    for flag, value, least, most in (
        ("--workers", workers, 1, INT32_MAX),
        ("--gpus-per-pod", gpus_per_pod, 1, INT32_MAX),
        ("--backoff-limit", backoff_limit, 0, INT32_MAX),
        ("--grace-period", grace_period, 30, INT64_SAFE_MAX),
    ):
        if value < least:
            why = " (the workers need time to checkpoint after SIGTERM)" if flag == "--grace-period" else ""
            raise UserError(
                f"{flag} {value}: must be at least {least}{why}", where=flag, fix=f"give {flag} {least} or more"
            )
        if value > most:
            raise UserError(
                f"{flag} {value}: more than the Kubernetes field holds ({most:,})",
                where=flag,
                fix=f"give {flag} {most} or less",
            )
    for flag, value in (("--cpu", cpu), ("--memory", memory), ("--shm-size", shm_size)):
        if not QUANTITY.match(str(value)):
            raise UserError(
                f"{flag} {value!r} is not a Kubernetes quantity", where=flag, fix="write e.g. 8, 500m, 48Gi"
            )


def chart_dir() -> Path:
    """The Helm chart this distil-run ships: helm/distil-run (`distil/chart` links to it in a
    source tree; a built wheel holds a copy there)."""
    return Path(__file__).resolve().parents[1] / "chart"


def helm_binary() -> str:
    """helm v3: $DISTIL_HELM, the one beside this Python (`make setup` puts it in .venv/bin), or PATH's."""
    beside = Path(sys.executable).with_name("helm")
    found = os.environ.get("DISTIL_HELM") or (str(beside) if beside.is_file() else None) or shutil.which("helm")
    if not found or not Path(found).is_file():
        raise UserError(
            f"distil k8s submit renders the distil-run Helm chart with helm v3, and {found or 'none'} is not a "
            "helm program",
            where="DISTIL_HELM" if os.environ.get("DISTIL_HELM") else "helm",
            fix="install helm v3 (https://helm.sh/docs/intro/install/; `make setup` puts one in .venv/bin) "
            "or set DISTIL_HELM to its path",
        )
    return found


def submit_values(
    cfg: DistilConfig,
    image: str,
    workers: int,
    gpus_per_pod: int,
    cpu: str,
    memory: str,
    shm_size: str,
    credentials_secret: str | None,
    backoff_limit: int,
    grace_period: int,
    service_account: str | None = None,
    min_workers: int | None = None,
    queue: str = "",
    priority_class: str = "",
    disruption_budget: bool = False,
) -> dict:
    """The chart's values for `distil k8s submit`'s flags: what a user would write in
    my-values.yaml for `helm install`. Objects are named after the run (fullnameOverride).
    `min_workers`: fewest worker pods an elastic run goes on with (None: `workers`, fixed);
    `queue`/`priority_class`: a Kueue LocalQueue and WorkloadPriorityClass; `disruption_budget`:
    a PodDisruptionBudget of one training pod at a time."""
    if not cfg.storage_root().is_s3:
        raise UserError(
            f"storage.uri is {cfg.storage.uri!r}: pods lose their disks on preemption",
            where="storage.uri",
            fix="use object storage: s3://bucket/prefix (with storage.endpoint_url for MinIO/Ceph/R2)",
        )
    check_submit_flags(workers, gpus_per_pod, cpu, memory, shm_size, backoff_limit, grace_period)
    least = workers if min_workers is None else min_workers
    if not 1 <= least <= workers:
        raise UserError(
            f"--min-workers {least}: an elastic run goes on with at least 1 worker pod and at most --workers {workers}",
            where="--min-workers",
            fix=f"give --min-workers between 1 and {workers}",
        )
    cfg.check_batch_split(range(least * gpus_per_pod, workers * gpus_per_pod + 1))
    run = cfg.run_name()
    # run.name written out (the chart labels every object with it); `scaling` as the chart sets it.
    config = cfg.model_dump(mode="json")
    config["run"]["name"] = run
    ranks = [least * gpus_per_pod, workers * gpus_per_pod] if least < workers else workers * gpus_per_pod
    config["scaling"].update(num_workers=ranks, use_gpu=True, gpus_per_worker=1)
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return {
        "mode": "job",
        "fullnameOverride": k8s_name(run),
        "config": config,
        "image": {"repository": repository, "tag": tag},
        "serviceAccount": {"create": False, "name": service_account or ""},
        "storage": {"credentialsSecret": credentials_secret or ""},
        "job": {"backoffLimit": backoff_limit},
        "terminationGracePeriodSeconds": grace_period,
        "kueue": {"queueName": queue, "priorityClass": priority_class},
        "podDisruptionBudget": {"enabled": disruption_budget, "maxUnavailable": 1},
        "workerGroups": [
            {
                "name": "gpu",
                "replicas": workers,
                "minReplicas": least,
                "gpusPerPod": gpus_per_pod,
                "shmSize": shm_size,
                "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
            }
        ],
    }


def render_chart(values: dict, namespace: str, chart: Path | None = None) -> list[dict]:
    """`helm template` of the chart with these values: the objects `helm install` would create
    (one source for the pod spec), labelled as made by distil, in `namespace`. What the chart
    refuses (its schema, its checks) comes back as one UserError."""

    helm = helm_binary()
    chart = chart or chart_dir()
    if not (chart / "Chart.yaml").is_file():
        raise UserError(
            f"no Helm chart at {chart}", where="--chart", fix="give the distil-run chart's folder (helm/distil-run)"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="distil-values-") as f:
        yaml.safe_dump(values, f, sort_keys=False)
        f.flush()
        r = subprocess.run(
            [
                helm,
                "template",
                values["fullnameOverride"],
                str(chart),
                "--namespace",
                namespace,
                "-f",
                f.name,
                "--skip-tests",
            ],  # the chart's `helm test` pod is not part of a run
            capture_output=True,
            text=True,
            timeout=120,
        )
    if r.returncode != 0:
        raise UserError(
            f"the distil-run chart refuses these settings: {_helm_error(r.stderr)}",
            where="distil k8s submit",
            fix="change the flag or config key it names",
        )
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
