"""Bad input: one clear message naming what and where, exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, base_config, write_config


def run_cli(config_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "distil.cli", "train", "--config", str(config_path)]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


CASES = {
    "invalid value": (["loss.temperature=-1"], "loss.temperature"),
    "unknown key": (["optim.learning_rate=1"], "optim.learning_rate"),
    "teacher missing": (["teacher.name_or_path=/nonexistent/teacher"], "teacher.name_or_path"),
    "hub teacher offline": (["teacher.name_or_path=no-such-org/no-such-model"], "teacher.name_or_path"),
    "empty corpus": ([], "data.sources"),
    "too long": (["data.max_len=4096"], "data.max_len"),
    "layer out of range": (["student.layers=[0, 7]"], "student.layers"),
    "fp16 on cpu": (["precision.dtype=fp16"], "precision.dtype"),
    "batch not divisible": (["train.global_batch_size=10"], "train.global_batch_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_message(case, tmp_path, teacher_dir):
    overrides, where = CASES[case]
    cfg = base_config(teacher_dir, tmp_path)
    if case == "empty corpus":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n   \n")
        cfg["data"]["sources"] = [str(empty)]
    path = write_config(tmp_path / "c.yaml", cfg)
    r = run_cli(path, *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("distil: error:")]
    assert len(errors) == 1 and where in r.stderr, r.stderr
    assert "fix:" in r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for bad input"


def test_missing_config_file(tmp_path):
    r = run_cli(tmp_path / "nope.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_ray_launch_refuses_a_batch_the_workers_cannot_split_before_ray(tmp_path, teacher_dir):
    """On the driver, before Ray starts, also when the data is a hub data set (which only the
    workers load, so the data checks cannot run on the driver)."""
    import sys

    from distil.config.schema import load_config
    from distil.errors import UserError
    from distil.launch.ray_job import launch

    cfg = base_config(
        teacher_dir,
        tmp_path,
        scaling={"num_workers": 3},
        train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 2},
    )
    cfg["data"]["sources"] = ["some-org/some-dataset"]
    loaded = load_config(write_config(tmp_path / "c.yaml", cfg))
    with pytest.raises(UserError) as e:
        launch(loaded)
    assert e.value.where == "train.global_batch_size" and "= 6" in str(e.value), str(e.value)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["a file", "not writable"])
def test_ray_launch_refuses_local_storage_it_cannot_write_before_ray(tmp_path, teacher_dir, monkeypatch, case):
    """storage.uri that is a file, or a folder this process cannot write: refused on the driver
    before Ray starts. (These machines run as root, which may write anywhere: 'not writable' is
    what os.access answers for a user without the permission, simulated here.)"""
    import os
    import sys

    from distil.config.schema import load_config
    from distil.errors import UserError
    from distil.launch.ray_job import launch

    target = tmp_path / "store"
    if case == "a file":
        target.write_text("x")
    else:
        target.mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(target) else real(p, mode, **kw))
    cfg = load_config(
        write_config(tmp_path / "c.yaml", base_config(teacher_dir, tmp_path, storage={"uri": str(target)}))
    )
    with pytest.raises(UserError) as e:
        launch(cfg)
    assert e.value.where == "storage.uri" and str(target) in str(e.value)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
