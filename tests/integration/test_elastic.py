"""Elastic on spot (issue 28), on a real local multi-node Ray cluster shaped like a KubeRay one
(bench/local_cluster.py): a head that runs no work (`--num-cpus 0`) and two worker nodes of one
CPU each, checkpoints in a real S3 endpoint (moto_server), the job submitted with `ray job
submit`. A node is lost by SIGKILLing its raylet, as when a spot VM vanishes; it comes back with
a new `ray start`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from bench.local_cluster import LocalCluster
from tests.conftest import write_config
from tests.integration.test_ray import _run_config, keys, wait_registered

pytestmark = pytest.mark.slow


def test_an_elastic_run_loses_a_node_goes_on_with_one_worker_and_grows_back(tmp_path, teacher_dir, s3_endpoint):
    """[1, 2] workers on two 1-CPU nodes. Node b is lost (raylet and workers SIGKILLed) as step 8's
    checkpoint is being uploaded: the run goes on with one worker, without a resubmission. Node b
    comes back and a later resize joins it. Then node b's pod is drained (the preStop hook), the
    drain's checkpoint is written, and the node goes: the run shrinks again from exactly that
    step, losing none. The run ends with the step count, samples and tokens of an uninterrupted
    run, every checkpoint intact, the resizes in its metrics, its trainer state and its log. (On
    this cluster the head has no CPU: the local corpus is prepared in the driver's process.)"""
    from distil.runs.catalog import list_checkpoints, verify_checkpoint
    from distil.storage.location import Storage

    s3, bucket, cfg = _run_config(tmp_path, teacher_dir, s3_endpoint)
    # (a shorter wait for a group that cannot be placed than Ray's 60 s)
    cfg["scaling"].update(
        num_workers=[1, 2], elastic_resize_interval_s=5, max_failures=3, worker_group_start_timeout_s=20
    )
    cfg["train"].update(max_steps=70, log_every=1)
    cfg["checkpoint"].update(every_steps=4, keep_last=30)  # every checkpoint kept, to verify each
    drain = {"DISTIL_PREEMPT_FILE": str(tmp_path / "distil-preempt"), "DISTIL_PREEMPT_WAIT": "600"}
    cluster = LocalCluster(env={**drain, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60"})  # (the config's wins)
    drained: list[int] = []

    def drain_node_b(proc) -> None:
        """What Kubernetes does to a drained pod: its preStop hook, then the pod goes."""
        hook = subprocess.run(
            [sys.executable, "-m", "distil.runs.preempt", "--timeout", "300"],
            capture_output=True,
            text=True,
            env={**os.environ, **drain},
            timeout=400,
        )
        m = re.search(r"checkpoint at step (\d+) persisted", hook.stdout)
        assert m, hook.stdout + hook.stderr
        wait_registered(s3, bucket, "runs/t", f"step_{int(m.group(1)):08d}", proc)
        Path(drain["DISTIL_PREEMPT_FILE"]).unlink()  # (the pod's /tmp goes with it)
        cluster.lose("node_b")
        drained.append(int(m.group(1)))

    staging = set(Path(tempfile.gettempdir()).glob("distil-t-rank*"))  # (workers' local folders)
    try:
        cluster.start("node_a", "node_b")
        proc = cluster.submit(write_config(tmp_path / "c.yaml", cfg))
        lines, lost_at, back, hook = [], None, False, None
        for line in proc.stdout:
            lines.append(line)
            # Step 8's checkpoint is written and handed to the uploads (async): the node goes now,
            # with its rank's upload in flight (unless it was quicker than this line).
            if lost_at is None and re.search(r"\bstep=8 checkpoint/save_s=", line):
                cluster.lose("node_b")
                lost_at = 8
            if "resize: 2 -> 1 workers" in line and not back:
                cluster.add("node_b")  # capacity comes back: joined at a later resize
                back = True
            if hook is None and "resize: 1 -> 2 workers" in line:
                hook = threading.Thread(target=drain_node_b, args=(proc,))
                hook.start()
        proc.wait(timeout=60)
        if hook is not None:
            hook.join(timeout=60)
        out = "".join(lines)
    finally:
        cluster.stop()
    assert proc.returncode == 0, out[-5000:]
    assert "the local source files are tokenized in this process" in out, out[-5000:]
    # A restart right after a loss still asks for the old size (Ray's view of the nodes lags) and
    # waits scaling.worker_group_start_timeout_s for it -- the config's 20 s, not the 60 s of the
    # cluster's environment.
    waits = set(re.findall(r"worker group startup timed out after ([\d.]+) seconds waiting for 2 workers", out))
    assert waits == {"20.0"}, waits
    # Four groups ran; the killed workers' folders (each with the checkpoint it had fetched) were
    # removed by the next worker on the node, the last group's by themselves.
    assert set(Path(tempfile.gettempdir()).glob("distil-t-rank*")) <= staging
    shrink = re.search(r"resize: 2 -> 1 workers at step (\d+) \(fewer could be placed", out)
    grow = re.search(r"resize: 1 -> 2 workers at step (\d+) \(capacity came back\)", out)
    assert shrink and grow and drained, out[-5000:]
    # The drained node's resize starts from the drain's checkpoint: no step is trained twice.
    (step_drained,) = drained
    assert f"resize: 2 -> 1 workers at step {step_drained} (fewer could be placed" in out, out[-5000:]
    # From step 8 when its upload was done before the node went, else from step 4: a checkpoint
    # whose upload was cut off is never resumed from, and step 8 is saved again over what it left.
    shrunk, grew = int(shrink.group(1)), int(grow.group(1))
    assert shrunk in (4, 8) and shrunk < grew < step_drained < 70 and grew % 4 == 0, (shrunk, grew, step_drained)
    # Each resize says how long the run trained nothing, from its last sign of life (a heartbeat
    # in storage at most every 2 s, or the checkpoint): a group that lost a node or was stopped to
    # grow may have trained past its checkpoint; a drained group stopped at its drain's checkpoint.
    signs = re.findall(
        r"resize: (\d) -> (\d) workers at step (\d+) .*?; down about \d+ s \(the run's last sign of life: step (\d+)\)",
        out,
    )
    signs = [(int(a), int(b), int(at), int(last)) for a, b, at, last in signs]
    assert [s[:3] for s in signs] == [(2, 1, shrunk), (1, 2, grew), (2, 1, step_drained)], out[-5000:]
    assert signs[0][3] >= shrunk and signs[1][3] >= grew and signs[2][3] == step_drained, signs

    def read(name: str, step: int = 70):
        return json.loads(s3.get_object(Bucket=bucket, Key=f"runs/t/step_{step:08d}/{name}")["Body"].read())

    state = read("trainer_state.json")
    assert state["step"] == 70 and state["world_size"] == 1
    assert read("trainer_state.json", 8)["world_size"] == (1 if shrunk == 4 else 2)  # (saved again, whole)
    # Both ranks' shards, from two nodes, in one checkpoint (Ray merges the ranks' uploads).
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        read("COMPLETE", step_drained)["files"]
    )
    assert state["resizes"] == [
        {"step": shrunk, "from": 2, "to": 1},
        {"step": grew, "from": 1, "to": 2},
        {"step": step_drained, "from": 2, "to": 1},
    ]
    # The samples and tokens of an uninterrupted run, computed here from the prepared data.
    expected = _uninterrupted(s3, bucket, cfg, state["sampler"]["n"], 70, tmp_path / "prepared")
    assert state["sampler"] == expected["sampler"] and state["tokens"] == expected["tokens"], (state, expected)
    # The worker count of every logged step, as the run's history in storage keeps it.
    rows = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key="runs/t/metrics.jsonl")["Body"].iter_lines()]
    workers = {r["step"]: r["workers"] for r in rows if "workers" in r}
    assert sorted(workers) == list(range(1, 71))
    assert all(workers[s] == (1 if shrunk < s <= grew or s > step_drained else 2) for s in workers), workers
    # Every checkpoint whole (each file's sha256 against its manifest, read through from S3).
    storage = Storage(f"s3://{bucket}/runs/t", endpoint_url=cfg["storage"]["endpoint_url"])
    infos = list_checkpoints(storage)
    assert [c.step for c in infos if c.complete][-1] == 70 and all(c.complete for c in infos), infos
    assert all(verify_checkpoint(storage, c) is None for c in infos)
    summary = out[out.index("done: step 70") :]
    resizes = f"resizes: 2 -> 1 workers at step {shrunk}, 1 -> 2 at step {grew}, 2 -> 1 at step {step_drained}"
    assert resizes in summary, summary


def _uninterrupted(s3, bucket: str, cfg: dict, n: int, steps: int, dest: Path) -> dict:
    """The sampler's position and the tokens an uninterrupted run trains in `steps` steps: the
    sequences of the global order (distil/data/batches.py), their lengths read from the prepared
    data in storage (STORAGE/data/<fingerprint>/)."""
    from distil.data import shards
    from distil.data.batches import ResumableSampler

    for key in keys(s3, bucket, "runs/data/"):
        if not key.endswith("/"):
            (dest / key).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(dest / key))
    (manifest,) = (dest / "runs" / "data").glob(f"*/{shards.MANIFEST}")
    train = shards.PreparedData(manifest.parent).splits["train"]
    assert len(train) == n
    g = cfg["train"]["global_batch_size"]
    sampler = ResumableSampler(n, cfg["run"]["seed"], step_size=g)  # (base_config: packed, no length grouping)
    drawn = [i for _ in range(steps) for i in sampler.next_indices(g, 0, g)]
    lengths = train.lengths()
    tokens = int(sum(min(int(lengths[i]), cfg["data"]["max_len"]) for i in drawn))
    return {"sampler": sampler.state_dict(), "tokens": tokens}
