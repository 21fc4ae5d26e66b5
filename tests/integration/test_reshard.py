"""Resuming on another worker count (spot capacity came back smaller or larger): DeepSpeed
ZeRO-2 on CPU under torchrun (gloo), a checkpoint written by 2 ranks resumed by 1 and by 3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distil.runs import layout as ckpt
from tests.conftest import ROOT, base_config, write_config

pytestmark = pytest.mark.slow
STEP3 = "step_00000003"


def torchrun(n: int, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


def config(tmp_path: Path, teacher_dir: Path, name: str) -> Path:
    # 12 = micro 2 x {1, 2, 3} workers x {6, 3, 2} accumulation steps: one global batch for all.
    cfg = base_config(
        teacher_dir,
        tmp_path,
        run={"name": name, "seed": 0},
        train={"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 12, "log_every": 3},
        checkpoint={"every_steps": 3, "keep_last": 3},
    )
    cfg["data"]["cache_dir"] = str(tmp_path.parent / "cache")
    return write_config(tmp_path / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, teacher_dir):
    """An uninterrupted 6-step run on 2 ranks, checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("reshard")
    torchrun(2, "-m", "distil.cli", "train", "--config", str(config(tmp, teacher_dir, "a")))
    return tmp, tmp / "runs" / "a"


def saved_partitions(ckpt_dir: Path) -> dict[str, list[torch.Tensor]]:
    """The ZeRO-2 optimizer state as written, each group's flat rank partitions concatenated."""
    files = sorted(ckpt_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))
    sds = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    out = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    for g in range(len(sds[0]["single_partition_of_fp32_groups"])):
        out["fp32"].append(torch.cat([sd["single_partition_of_fp32_groups"][g] for sd in sds]))
        for k in ("exp_avg", "exp_avg_sq"):
            out[k].append(torch.cat([sd["base_optimizer_state"]["state"][g][k] for sd in sds]))
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_resume_on_another_worker_count_repartitions_zero2_state(two_rank_run, teacher_dir, workers):
    tmp, a_root = two_rank_run
    name = f"w{workers}"
    root = tmp / "runs" / name
    root.mkdir(parents=True)
    shutil.copytree(a_root / STEP3, root / STEP3)  # run `a` as it stood when preempted at step 3
    probe = tmp / f"probe-{name}"
    probe.mkdir()
    out = torchrun(workers, "-m", "tests.integration.reshard_probe", str(config(tmp, teacher_dir, name)), str(probe))
    assert f"written by 2 workers, ZeRO-2 state re-partitioned for {workers}" in out, out[-3000:]

    # Every rank's new partition, concatenated, is the saved state, bit for bit (the tails are
    # ZeRO's alignment padding, which differs with the world size and holds zeros).
    loaded = [torch.load(probe / f"rank{r}.pt") for r in range(workers)]
    saved = saved_partitions(a_root / STEP3)
    model_states = torch.load(a_root / STEP3 / "mp_rank_00_model_states.pt", weights_only=False)
    assert "universal_checkpoint_info" in model_states  # DeepSpeed's ds_to_universal converts it as it is
    for key, groups in saved.items():
        for g, want in enumerate(groups):
            got = torch.cat([part[key][g] for part in loaded])
            n = min(len(want), len(got))
            assert torch.equal(got[:n], want[:n]), (key, g)
            assert not want[n:].any() and not got[n:].any(), (key, g)
    assert all(part["adam_step"] == [3.0, 3.0] and part["step"] == 3 for part in loaded)

    # The run then goes on to its last step, training each global batch once: the same samples
    # (hence the same token count and sampler position) as the uninterrupted 2-rank run.
    end, ref = ckpt.read_trainer_state(root / "step_00000006"), ckpt.read_trainer_state(a_root / "step_00000006")
    assert end["step"] == 6 and end["world_size"] == workers
    assert (end["tokens"], end["sampler"]) == (ref["tokens"], ref["sampler"])
    assert ckpt.latest_tag(root) == "step_00000006" and not list((tmp / "runs" / name).glob("universal-rank*"))
    # Its own checkpoints are ordinary ZeRO-2 ones, sharded for its own worker count.
    assert len(list((root / "step_00000006").glob("zero_pp_rank_*_optim_states.pt"))) == workers
    assert ckpt.read_complete(root / "step_00000006")["world_size"] == workers


def test_frozen_embeddings_stay_the_teachers_through_a_resume_on_another_worker_count(tmp_path, teacher_dir):
    """student.freeze_embeddings: the frozen tensor is no optimizer state, so DeepSpeed's
    universal conversion must carry it in the module's state. 2 workers to step 3, then 1
    worker to step 6: the exported embeddings are still the teacher's, bit for bit."""
    from safetensors.torch import load_file

    path = config(tmp_path, teacher_dir, "frozen")
    cfg = __import__("yaml").safe_load(path.read_text())
    cfg["student"]["freeze_embeddings"] = True
    write_config(path, cfg)
    torchrun(2, "-m", "distil.cli", "train", "--config", str(path), "--set", "train.max_steps=3")
    out = torchrun(1, "-m", "distil.cli", "train", "--config", str(path))
    assert "written by 2 workers, ZeRO-2 state re-partitioned for 1" in out, out[-3000:]
    assert ckpt.read_trainer_state(tmp_path / "runs" / "frozen" / "step_00000006")["step"] == 6
    key = "bert.embeddings.word_embeddings.weight"
    exported = load_file(str(tmp_path / "runs" / "frozen" / "model" / "model.safetensors"))
    assert torch.equal(exported[key], load_file(str(teacher_dir / "model.safetensors"))[key])
