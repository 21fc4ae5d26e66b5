"""A time budget for the training loop (train.time_budget_minutes): the same run on a faster or a
slower machine ends in about the same wall time, having trained what that time allows.

The budget is turned into a number of steps once, early, and kept: the run times its steps up to
`PLAN_AT`, plans `budget / (seconds per step)` steps (never more than train.max_steps) and from
then on the learning rate follows the schedule of a run of that many steps (its warmup and its
linear decay to 0 at the planned end, distil/train/setup.py `lr_lambda`) -- a schedule that ends
with the budget, rather than one cut off half-way (Li, Yumer & Ramanan 2020, "Budgeted training"). The
plan is saved in every checkpoint, so a resumed run, on whatever machine, ends at the same step
with the same weights as one that was never interrupted. The steps before `PLAN_AT` do not
depend on the plan: their learning rate is the warmup's, or the decay towards train.max_steps.

What the budget covers: the optimizer steps. The evaluations at step 0 and at the end, periodic
ones (train.eval_every) and checkpoint saves come on top, and the pace of the first steps is an
estimate: a run may end some seconds before or after its budget.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

PLAN_AT = 36  # the step at which the plan is made: 35 timed steps (the first is set-up, not pace)


def planned_steps(budget_s: float, seconds_per_step: float, max_steps: int) -> int:
    """How many steps fit in `budget_s` at the measured pace: at least PLAN_AT (they are done by
    then), at most max_steps."""
    fit = budget_s / seconds_per_step if seconds_per_step > 0 else math.inf
    return max_steps if fit >= max_steps else max(PLAN_AT, math.floor(fit))  # (never floor() of inf)


class TimeBudget:
    """The plan of one run. `minutes`: train.time_budget_minutes (None: no budget, the run ends
    at max_steps). The same on every rank: the pace is the slowest rank's."""

    def __init__(self, minutes: float | None, max_steps: int, device: torch.device):
        self.minutes, self.max_steps, self.device = minutes, max_steps, device
        self.planned: int | None = None
        self.seconds_per_step: float | None = None
        self._t0: float | None = None  # the end of this process's first step, and that step
        self._from_step: int | None = None
        self._loop = (time.perf_counter(), 0)  # (time, step) before this process's first step: begin()

    def notice(self) -> str | None:
        """A line to log at the start when the budget cannot plan anything (else None)."""
        if self.minutes is not None and self.max_steps <= PLAN_AT:
            return (
                f"time budget {self.minutes:g} min not used: train.max_steps {self.max_steps} is within the {PLAN_AT} "
                "steps the budget times before it plans; the run takes its max_steps"
            )
        return None

    def planned_end(self) -> int | None:
        """The step the plan ends at (max_steps if a resume lowered it below the plan), None until
        the plan is made."""
        return None if self.planned is None else min(self.planned, self.max_steps)

    def end_step(self) -> int:
        """The step the run ends at: the plan, or max_steps."""
        end = self.planned_end()
        return self.max_steps if end is None else end

    def begin(self, step: int) -> None:
        """Before this process's first step (fresh or resumed at `step`)."""
        self._loop = (time.perf_counter(), step)

    def after_step(self, step: int) -> str | None:
        """Call after every optimizer step (on every rank); at step PLAN_AT makes the plan and
        returns its log line, else None."""
        if self.minutes is None or self.planned is not None or step > PLAN_AT or self.max_steps <= PLAN_AT:
            return None
        if self._t0 is None:  # this process's first step carries set-up costs: time from its end
            self._t0, self._from_step = time.perf_counter(), step
        if step < PLAN_AT:
            return None
        t0, first = (self._t0, self._from_step) if self._from_step < step else self._loop  # resumed just before PLAN_AT
        pace = torch.tensor((time.perf_counter() - t0) / (step - first), dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(pace, op=dist.ReduceOp.MAX)
        self.seconds_per_step = float(pace)
        self.planned = planned_steps(self.minutes * 60, self.seconds_per_step, self.max_steps)
        return (
            f"time budget {self.minutes:g} min: {self.seconds_per_step:.3f} s/step over steps {first + 1}-{step} "
            f"-> {self.planned:,} of train.max_steps {self.max_steps:,} steps; the learning rate decays to step "
            f"{self.planned:,}"
        )

    def state_dict(self) -> dict:
        return {"planned_steps": self.planned, "seconds_per_step": self.seconds_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.planned, self.seconds_per_step = state.get("planned_steps"), state.get("seconds_per_step")
