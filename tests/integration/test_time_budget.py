"""train.time_budget_minutes through the real command line: the run plans its steps from its own
pace, decays the learning rate to that plan, ends there, keeps the plan in its checkpoints (a
resume ends at the same step with the same weights, whatever its own pace) and, run again,
says it is finished."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from distil.train.budget import PLAN_AT
from tests.conftest import base_config, write_config
from tests.integration.test_train_local import cli, metrics

pytestmark = pytest.mark.slow

MAX_STEPS = 4000
BUDGET_MIN = 0.25


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, teacher_dir):
    """One run with a budget of 15 s of steps: hundreds of this tiny model's steps, far below
    max_steps, and at least the 50 the resume test needs even at 0.3 s a step (a loaded 2-core
    machine once planned too few with a 5 s budget, and the resume test failed)."""
    tmp = tmp_path_factory.mktemp("budget")
    cfg = base_config(
        teacher_dir,
        tmp,
        train={"max_steps": MAX_STEPS, "log_every": 1, "time_budget_minutes": BUDGET_MIN},
        checkpoint={"every_steps": 10, "keep_last": 100},
    )
    path = write_config(tmp / "c.yaml", cfg)
    out = cli(path).stdout
    return tmp, path, out


def _plan(run) -> int:
    """The plan, as the run's newest checkpoint records it."""
    return json.loads((run / (run / "latest").read_text() / "COMPLETE").read_text())["planned_steps"]


def test_the_run_ends_at_its_plan_with_the_learning_rate_decayed_to_it(budgeted):
    tmp, _, out = budgeted
    run = tmp / "runs" / "t"
    planned = _plan(run)
    assert PLAN_AT <= planned < MAX_STEPS, out[-2000:]
    assert f"-> {planned:,} of train.max_steps {MAX_STEPS:,} steps" in out
    assert (run / "latest").read_text() == f"step_{planned:08d}"
    rows = [r for r in metrics(run) if "lr" in r]
    assert rows[-1]["step"] == planned and rows[-1]["lr"] == 0.0  # decayed to the plan, not to max_steps
    # Up to the plan, the schedule is the one towards max_steps (warmup 10% of 4,000 = 400 steps);
    # after it, the one of a run of the planned steps: warmup 10% of the plan (a warmup still going
    # at the plan is joined to its peak), then the linear decay to the planned step.
    base, warmup, short = 1e-3, int(0.1 * MAX_STEPS), int(0.1 * planned)
    at_plan = (PLAN_AT + 1) / warmup
    for r in rows:  # the lr logged after step s: the scheduler's for step s
        s = r["step"]
        if s <= PLAN_AT:  # the plan is made after step PLAN_AT's scheduler step
            want = (s + 1) / warmup
        elif s < short:
            want = at_plan + (1 - at_plan) * (s - PLAN_AT) / (short - 1 - PLAN_AT)
        else:
            want = (planned - s) / (planned - short)
        assert r["lr"] == pytest.approx(base * want, rel=1e-9, abs=1e-15), s
    if short > PLAN_AT + 1:  # the warmup, re-sloped, still reaches the configured rate
        assert max(r["lr"] for r in rows) == pytest.approx(base)
    state = json.loads((run / f"step_{planned:08d}" / "trainer_state.json").read_text())
    assert state["planned_steps"] == planned and state["seconds_per_step"] > 0
    card = (run / "model" / "README.md").read_text()
    assert (
        f"| trained | {planned:,} of {planned:,} steps (what a {BUDGET_MIN:g}-minute time budget planned; max_steps {MAX_STEPS:,}),"
        in card
    )
    assert f"done: step {planned}, " in out and "(the steps its time budget planned)" in out


def test_a_resumed_run_keeps_the_plan_and_ends_with_the_same_weights(budgeted, tmp_path):
    tmp, _, _ = budgeted
    run = tmp / "runs" / "t"
    planned = _plan(run)
    resume_at = 40  # after the plan was made (PLAN_AT = 36): the checkpoint carries it
    assert planned > resume_at + 10, f"the budget planned only {planned} steps on this machine"
    copy = tmp_path / "runs" / "t"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    for ckpt in copy.glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > resume_at:
            shutil.rmtree(ckpt)
    (copy / "latest").write_text(f"step_{resume_at:08d}")
    path = write_config(tmp_path / "c.yaml", {**_config_of(budgeted), "storage": {"uri": str(tmp_path / "runs")}})
    out = cli(path).stdout
    assert "s/step over steps" not in out  # no second plan: the resumed run's own pace does not matter
    assert (copy / "latest").read_text() == f"step_{planned:08d}"
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(copy / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_the_same_command_again_says_the_run_is_finished(budgeted):
    tmp, path, _ = budgeted
    run = tmp / "runs" / "t"
    planned = _plan(run)
    before = sorted(p.name for p in run.iterdir())
    out = cli(path).stdout
    assert f"is already finished: its checkpoint {run / f'step_{planned:08d}'} is at step {planned}" in out
    assert "time budget (train.time_budget_minutes) planned" in out and sorted(p.name for p in run.iterdir()) == before


def _config_of(budgeted) -> dict:
    return yaml.safe_load(budgeted[1].read_text())


def test_a_ray_driver_reads_the_plan_from_storage_too(budgeted):
    """jobs/distill.py asks the storage (here a local folder, as S3 would be listed) before Ray
    starts: the plan comes from the newest checkpoint's COMPLETE record."""
    from distil.config.schema import load_config
    from distil.runs import continuity

    tmp, path, _ = budgeted
    planned = _plan(tmp / "runs" / "t")
    message = continuity.check(load_config(path), lambda m: None).finished
    assert message is not None and f"the {planned:,} steps its time budget" in message
    more = load_config(path, ["train.max_steps=100000"])  # max_steps may change on a resume; the plan stays
    assert f"the {planned:,} steps its time budget" in continuity.check(more, lambda m: None).finished
