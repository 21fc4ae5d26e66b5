"""The time budget's plan (distil/train/budget.py) and the schedule that decays to it, on a fake clock."""

from __future__ import annotations

import pytest
import torch

from distil.train import budget
from distil.train.budget import PLAN_AT, TimeBudget, planned_steps
from tests.conftest import ROOT


def test_planned_steps_is_what_fits_between_plan_at_and_max_steps():
    assert planned_steps(60.0, 0.25, 1000) == 240
    assert planned_steps(60.0, 0.7, 1000) == 85  # 85.7 steps fit: the 86th would not
    assert planned_steps(600.0, 0.25, 1000) == 1000  # never past max_steps
    assert planned_steps(1.0, 0.25, 1000) == PLAN_AT  # the steps already done stay done
    assert planned_steps(6e307, 0.25, 1000) == 1000  # issue 27: floor(inf) raised OverflowError at the plan
    assert planned_steps(60.0, 0.0, 1000) == 1000


def test_a_budget_too_large_to_mean_anything_is_refused_and_one_that_cannot_plan_says_so():
    """Issue 27: 1e306 minutes passed validation and crashed at step 36, after a checkpoint; a
    budget with max_steps within the planning steps was silently ignored."""
    from distil.config.schema import load_config
    from distil.errors import UserError

    with pytest.raises(UserError, match="train.time_budget_minutes: Input should be less than or equal to 1000000"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.time_budget_minutes=1e306"])
    assert TimeBudget(5.0, PLAN_AT, torch.device("cpu")).notice() == (
        f"time budget 5 min not used: train.max_steps {PLAN_AT} is within the {PLAN_AT} steps the budget times before it "
        "plans; the run takes its max_steps"
    )
    assert TimeBudget(5.0, PLAN_AT + 1, torch.device("cpu")).notice() is None
    assert TimeBudget(None, 10, torch.device("cpu")).notice() is None


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(b: TimeBudget, clock: FakeClock, first: int, last: int, seconds: dict[int, float]) -> list[tuple[int, str]]:
    """Steps first+1..last, step s taking seconds.get(s, 0.5); returns the (step, line) of the plan."""
    b.begin(first)
    lines = []
    for s in range(first + 1, last + 1):
        clock.now += seconds.get(s, 0.5)
        line = b.after_step(s)
        if line:
            lines.append((s, line))
    return lines


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(budget.time, "perf_counter", c)
    return c


def test_the_plan_is_made_at_plan_at_from_the_pace_after_the_first_step(clock):
    b = TimeBudget(2.0, 1000, torch.device("cpu"))
    # the first step is set-up (10 s): not pace; the others take 0.5 s
    lines = _run(b, clock, 0, 60, {1: 10.0})
    assert [s for s, _ in lines] == [PLAN_AT]
    assert b.seconds_per_step == pytest.approx(0.5) and b.planned == 240 == b.end_step()
    assert "0.500 s/step over steps 2-36 -> 240 of train.max_steps 1,000 steps" in lines[0][1]


def test_no_budget_or_few_steps_means_max_steps(clock):
    b = TimeBudget(None, 1000, torch.device("cpu"))
    assert _run(b, clock, 0, 50, {}) == [] and b.end_step() == 1000 and b.planned is None
    short = TimeBudget(0.01, PLAN_AT, torch.device("cpu"))  # ends before a plan could matter
    assert _run(short, clock, 0, PLAN_AT, {}) == [] and short.end_step() == PLAN_AT


def test_a_resumed_run_keeps_its_plan_whatever_its_pace(clock):
    first = TimeBudget(2.0, 1000, torch.device("cpu"))
    _run(first, clock, 0, 40, {})
    resumed = TimeBudget(2.0, 1000, torch.device("cpu"))
    resumed.load_state_dict({"step": 40, **first.state_dict()})
    assert _run(resumed, clock, 40, 80, {s: 5.0 for s in range(41, 81)}) == []  # ten times slower: no new plan
    assert resumed.end_step() == 240
    lowered = TimeBudget(2.0, 200, torch.device("cpu"))  # max_steps lowered on the resume: the smaller end
    lowered.load_state_dict(first.state_dict())
    assert lowered.end_step() == 200


def test_a_run_resumed_just_before_plan_at_times_the_steps_it_has(clock):
    b = TimeBudget(2.0, 1000, torch.device("cpu"))
    lines = _run(b, clock, PLAN_AT - 1, PLAN_AT, {PLAN_AT: 0.8})
    assert [s for s, _ in lines] == [PLAN_AT] and b.seconds_per_step == pytest.approx(0.8) and b.planned == 150


def test_the_learning_rate_decays_to_the_plan_once_it_is_made(clock):
    from distil.config.schema import load_config
    from distil.train.setup import lr_lambda

    cfg = load_config("configs/demo.yaml", ["train.max_steps=1000", "optim.warmup_ratio=0.02"])  # warmup: 20 steps
    b = TimeBudget(2.0, 1000, torch.device("cpu"))
    f = lr_lambda(cfg, b.planned_end)
    before = [f(s) for s in range(0, 300)]
    assert before[:20] == [(s + 1) / 20 for s in range(20)]
    assert before[100] == pytest.approx((1000 - 100) / 980)
    _run(b, clock, 0, PLAN_AT, {})
    assert b.planned == 240
    assert [f(s) for s in range(0, PLAN_AT + 1)] == before[: PLAN_AT + 1]  # the steps done before the plan
    # after it, the decay of a 240-step run: its warmup, 2% of 240 = 4 steps, is long over
    assert f(100) == pytest.approx((240 - 100) / (240 - 4)) and f(240) == 0.0 and f(260) == 0.0


def _plan_at(b: TimeBudget, clock, seconds_per_step: float) -> None:
    _run(b, clock, 0, PLAN_AT, {s: seconds_per_step for s in range(1, PLAN_AT + 1)})


def test_a_plan_shorter_than_the_warmup_still_ends_at_zero(clock):
    """The CI machine once planned 372 of 4,000 steps with a 400-step warmup: the run ended
    part-way up the warmup at 93% of the peak rate. The warmup is the plan's now."""
    from distil.config.schema import load_config
    from distil.train.setup import lr_lambda

    cfg = load_config("configs/demo.yaml", ["train.max_steps=1000", "optim.warmup_ratio=0.5"])  # warmup: 500 steps
    b = TimeBudget(1.0, 1000, torch.device("cpu"))
    f = lr_lambda(cfg, b.planned_end)
    _plan_at(b, clock, 0.25)
    assert b.planned == 240  # the plan's warmup: 120 steps, going on at the plan
    lr = [f(s) for s in range(0, 241)]
    assert lr[: PLAN_AT + 1] == [(s + 1) / 500 for s in range(PLAN_AT + 1)]  # towards max_steps' warmup
    at_plan = (PLAN_AT + 1) / 500
    for s in range(PLAN_AT + 1, 120):  # joined to the peak at the plan's warmup's last step
        assert lr[s] == pytest.approx(at_plan + (1 - at_plan) * (s - PLAN_AT) / (119 - PLAN_AT)), s
    assert lr[119] == pytest.approx(1.0) and max(lr) == pytest.approx(1.0)
    assert all(lr[s] == pytest.approx((240 - s) / 120) for s in range(120, 241)) and lr[240] == 0.0

    short = TimeBudget(1.0, 1000, torch.device("cpu"))
    g = lr_lambda(cfg, short.planned_end)
    _plan_at(short, clock, 1.25)  # 48 steps fit: the plan's warmup (24 steps) is already over
    assert short.planned == 48
    assert [g(s) for s in range(PLAN_AT + 1, 49)] == pytest.approx([(48 - s) / 24 for s in range(PLAN_AT + 1, 49)])
    assert g(48) == 0.0
