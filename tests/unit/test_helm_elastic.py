"""The chart's elastic worker groups, Kueue section and PodDisruptionBudget (issue 28), rendered
with the real helm and checked as values. (No Kubernetes API server or Kueue controller can run
here: the objects are validated against their schemas by tests/unit/test_helm_chart.py's
scenario test, which renders ci/elastic-values.yaml and ci/kueue-values.yaml too.)"""

from __future__ import annotations

import yaml

from distil.config.schema import DistilConfig
from tests.unit.test_helm_chart import CHART, GROUP, by_kind, helm, render


def _config_of(docs: dict) -> DistilConfig:
    return DistilConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]))


def test_an_elastic_group_renders_a_range_a_kueue_elastic_job_and_a_disruption_budget():
    docs = render("-f", str(CHART / "ci" / "elastic-values.yaml"))
    kinds = by_kind(docs)
    cfg = _config_of(kinds)
    assert cfg.scaling.num_workers == (4, 8) and cfg.scaling.elastic and cfg.scaling.elastic_resize_interval_s == 120
    job = kinds["RayJob"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (8, 4, 8)
    assert "enableInTreeAutoscaling" not in job["spec"]["rayClusterSpec"]  # plain replica recreation
    labels, annotations = job["metadata"]["labels"], job["metadata"]["annotations"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-spot" and labels["kueue.x-k8s.io/priority-class"] == "distil-low"
    assert annotations["kueue.x-k8s.io/elastic-job"] == "true" and job["spec"]["shutdownAfterJobFinishes"] is True
    pdb = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    worker = group["template"]["metadata"]["labels"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert selector.items() <= worker.items() and not selector.items() <= head.items()


def test_a_fixed_run_on_kueue_is_no_elastic_job_and_plain_values_have_neither():
    job = by_kind(render("-f", str(CHART / "ci" / "kueue-values.yaml")))["RayJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/elastic-job" not in job["metadata"]["annotations"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    plain = by_kind(render())
    assert "PodDisruptionBudget" not in plain and not any(
        k.startswith("kueue.x-k8s.io/") for k in plain["RayJob"]["metadata"]["labels"]
    )
    assert _config_of(plain).scaling.num_workers == 2


def test_min_replicas_over_two_groups_sum_to_the_range(tmp_path):
    values = {
        "workerGroups": [
            {**GROUP, "name": "spot", "replicas": 3, "minReplicas": 0, "gpusPerPod": 2},
            {**GROUP, "name": "ondemand", "replicas": 1, "gpusPerPod": 2},
        ],
        "config": {"train": {"micro_batch_size": 1, "global_batch_size": 840}},  # splits for 2..8
    }
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    assert _config_of(by_kind(render("-f", str(f)))).scaling.num_workers == (2, 8)


BAD = [
    ({"workerGroups": [{**GROUP, "minReplicas": 3}]}, "workerGroups[gpu]: minReplicas 3 is more than replicas 2"),
    ({"workerGroups": [{**GROUP, "minReplicas": 0}]}, "every group's minReplicas is 0"),
    ({"workerGroups": [{**GROUP, "minReplicas": -1}]}, "at '/workerGroups/0/minReplicas': minimum"),
    (
        {"workerGroups": [{**GROUP, "replicas": 4, "minReplicas": 1}], "config": {"train": {"global_batch_size": 64}}},
        "not a multiple of micro_batch_size 16 x 3 GPU workers = 48 (an elastic run trains on any count from 1 to 4)",
    ),
    (
        {"workerGroups": [{**GROUP, "minReplicas": 1}], "config": {"scaling": {"num_workers": 2}}},
        "config.scaling.num_workers is 2 but the worker groups give [1 2] GPU workers",
    ),
    ({"mode": "cluster", "kueue": {"queueName": "q"}}, "kueue.queueName is set but mode is cluster"),
    (
        {"kueue": {"queueName": "q"}, "job": {"shutdownAfterJobFinishes": False}},
        "Kueue requires a RayJob to delete its cluster",
    ),
    ({"kueue": {"queueName": "q"}, "dataWorkers": {"replicas": 1}}, "requires KubeRay's autoscaler off"),
    ({"kueue": {"queueName": "Not_A_Name"}}, "at '/kueue/queueName'"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}}, "at '/podDisruptionBudget/maxUnavailable'"),
]


def test_inconsistent_elastic_values_fail(tmp_path):
    for values, message in BAD:
        f = tmp_path / "bad.yaml"
        f.write_text(yaml.safe_dump(values))
        r = helm("template", "rel", str(CHART), "-f", str(f))
        assert r.returncode != 0 and message in r.stderr, (values, r.stderr)
