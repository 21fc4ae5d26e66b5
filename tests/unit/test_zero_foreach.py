"""distil.train.zero_foreach: ZeRO-2's overflow check and gradient norm as multi-tensor kernels give
DeepSpeed's own results (and the norm an independent plain-torch one), on a real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def results():
    r = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("zero_foreach_check.py"))],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_installed_on_a_zero2_optimizer(results):
    assert results["installed"] and results["n_grads"] == 6 and results["stepped"] == 1


def test_grad_norm_equals_deepspeed_and_plain_torch(results):
    ds, ours, plain = results["norm_deepspeed"], results["norm_foreach"], results["norm_plain_torch"]
    assert ours == pytest.approx(ds, rel=1e-6) and ours == pytest.approx(plain, rel=1e-5)


def test_invalid_norm_gives_deepspeeds_sentinel(results):
    assert results["norm_with_nan"] == [-1.0, -1.0]


def test_overflow_flag_equals_deepspeed(results):
    assert results["overflow"] == {
        "finite": [False, False],
        "nan": [True, True],
        "inf": [True, True],
        "-inf": [True, True],
    }


def test_other_optimizers_are_left_alone():
    from distil.train import zero_foreach

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert zero_foreach.install(opt) is False and "get_grad_norm_direct" not in vars(opt)
