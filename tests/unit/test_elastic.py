"""An elastic run's config (issue 28): `scaling.num_workers` as a [min, max] range, the global
batch that must split for every count of it, and what a resize leaves in the summary and the
model card. (The run itself, on a local multi-node Ray cluster: tests/integration/test_elastic.py.)"""

from __future__ import annotations

import json
import math

import pytest

from distil.config.schema import load_config
from distil.errors import UserError
from tests.conftest import ROOT, fake_checkpoint
from tests.integration.test_trust_cli import distil

DEMO = ROOT / "configs" / "demo.yaml"


def _cfg(*overrides: str):
    return load_config(DEMO, list(overrides))


def test_a_range_is_elastic_and_a_number_or_an_empty_range_is_fixed():
    c = _cfg("scaling.num_workers=[2, 8]")
    assert c.scaling.elastic and (c.scaling.min_workers, c.scaling.max_workers) == (2, 8)
    assert list(c.scaling.worker_counts()) == [2, 3, 4, 5, 6, 7, 8]
    assert "num_workers:\n  - 2\n  - 8\n" in c.to_yaml()  # saved as the list it was written as
    assert load_config(DEMO, ["scaling.num_workers=[2, 8]"]).run_name() == _cfg().run_name()  # scaling may change
    for fixed in ("scaling.num_workers=3", "scaling.num_workers=[3, 3]"):
        c = _cfg(fixed)
        assert not c.scaling.elastic and c.scaling.num_workers == 3 and list(c.scaling.worker_counts()) == [3]


@pytest.mark.parametrize(
    "value, says",
    [
        ("[3, 2]", "[3, 2]: min is more than max; write [2, 3]"),
        ("[0, 2]", "[0, 2]: an elastic run needs at least 1 worker"),
        ("[1, 2, 3]", "[1, 2, 3] is not a number of workers or a [min, max] range"),
        ("[true, 2]", "is not a number of workers or a [min, max] range"),
        ("[1, 70000]", "at most 65,536 workers"),
        ("0", "0: a run needs at least 1 worker"),
    ],
)
def test_a_bad_range_is_one_message(value, says):
    with pytest.raises(UserError, match="scaling.num_workers") as e:
        _cfg(f"scaling.num_workers={value}")
    assert says in str(e.value)


def test_a_global_batch_must_split_for_every_count_of_the_range():
    """Named: the counts that fail, and a batch that works for all (checked here by its definition:
    the least multiple of every micro-batch x count that is at least the configured batch)."""
    c = _cfg("scaling.num_workers=[2, 6]", "train.micro_batch_size=4", "train.global_batch_size=48")
    with pytest.raises(UserError) as e:
        c.check_batch_split(c.scaling.worker_counts())
    failing = [n for n in range(2, 7) if 48 % (4 * n)]
    assert failing == [5]
    assert "for 1 of the worker counts 2..6 an elastic run may have: 5" in str(e.value)
    every = math.lcm(*(4 * n for n in range(2, 7)))
    works = next(b for b in range(48, 10**6) if b % every == 0)
    assert f"e.g. {works:,}" in str(e.value) and works == 240
    _cfg("scaling.num_workers=[2, 6]", "train.micro_batch_size=4", "train.global_batch_size=240").check_batch_split(
        range(2, 7)
    )
    # A count above global / micro never splits it (not even tried one by one).
    c = _cfg("scaling.num_workers=[1, 65536]", "train.micro_batch_size=1", "train.global_batch_size=4")
    with pytest.raises(UserError, match="65533 of the worker counts 1..65536") as e:
        c.check_batch_split(c.scaling.worker_counts())
    assert "narrow scaling.num_workers to counts that split it (1, 2, 4)" in str(e.value)
    assert "e.g." not in str(e.value)  # (the least batch for every count up to 65,536 has thousands of digits)


def test_bad_elastic_input_exits_2_with_one_message_and_writes_nothing(tmp_path):
    """A range on a local run, a range whose batch does not split, min > max: exit 2, one message."""
    runs = tmp_path / "runs"
    base = ["--config", str(DEMO), "--set", f"storage.uri={runs}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    base += ["--set", "train.micro_batch_size=8"]  # (global 64: 2 and 4 workers split it, 3 and 5 do not)
    cases = [
        (["train", *base, "--set", "scaling.num_workers=[1, 2]"], "an elastic run resizes a Ray Train worker group"),
        (["check", *base, "--set", "scaling.num_workers=[3, 2]"], "min is more than max"),
        (["check", *base, "--set", "scaling.num_workers=[2, 5]"], "an elastic run may have: 3, 5"),
        (["train", "--ray", *base, "--set", "scaling.num_workers=[2, 5]"], "an elastic run may have: 3, 5"),
    ]
    for args, says in cases:
        r = distil(*args)
        out = r.stdout + r.stderr
        assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
        assert [x for x in r.stderr.splitlines() if x.startswith("distil: error:")].__len__() == 1, r.stderr
        assert says in r.stderr and "fix:" in r.stderr, r.stderr
        assert not runs.exists() and not (tmp_path / "cache").exists(), args


def test_resizes_are_in_the_summary_and_the_model_card(tmp_path):
    from distil.runs.metrics_log import summary_lines
    from distil.runs.model_card import model_card

    resizes = [{"step": 120, "from": 4, "to": 2}, {"step": 300, "from": 2, "to": 4}]
    result = {
        "step": 400,
        "tokens": 1000,
        "start": {},
        "end": {},
        "wall_s": 60.0,
        "steps_run": 100,
        "tokens_per_s": 10.0,
        "resizes": resizes,
    }
    assert "  resizes: 4 -> 2 workers at step 120, 2 -> 4 at step 300" in summary_lines(result)
    assert not any("resizes" in line for line in summary_lines({**result, "resizes": []}))
    state = {"step": 400, "tokens": 1000, "world_size": 4, "resizes": resizes}
    d = fake_checkpoint(tmp_path, "step_00000400", {"trainer_state.json": json.dumps(state).encode()}, step=400)
    card = model_card(d, has_mlm_head=True)
    assert "on 4 worker(s) (resized: 4 -> 2 workers at step 120, 2 -> 4 at step 300)" in card


def test_a_worker_removes_what_killed_workers_of_its_node_left(tmp_path):
    """Ray stops a worker group by killing its actors (every resize of an elastic run, every lost
    worker), so their local folders -- each holding the checkpoint they resumed from -- stay. The
    next worker on the node removes those whose process is gone, and only those."""
    import os
    import subprocess
    import sys

    from distil.launch.ray_job import staging_folder

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = tmp_path / f"distil-t-rank1-pid{ended.pid}-k2j4x9_a"
    (left / "step_00000008").mkdir(parents=True)
    (left / "step_00000008" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 4096)
    alive = tmp_path / f"distil-t-rank0-pid{os.getpid()}-q8w7e6r5"  # a worker still running here
    alive.mkdir()
    other = tmp_path / f"distil-t-rank1-{ended.pid}"  # not a worker's folder: not ours to remove
    other.mkdir()
    new = staging_folder("t", 2, tmp_path)
    assert not left.exists() and alive.is_dir() and other.is_dir()
    assert new.is_dir() and new.parent == tmp_path and new.name.startswith(f"distil-t-rank2-pid{os.getpid()}-")
