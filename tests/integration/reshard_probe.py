"""Run under torchrun by test_reshard.py: resume a run, save this rank's ZeRO-2 partition of
the optimizer state as loaded (before any step), then train on as `distil train` would."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distil.launch.local import run_training
from distil.quiet import quiet_libraries
from distil.train.trainer import Trainer


def main(config: str, out: str) -> None:
    resume = Trainer.resume

    def probe(self: Trainer) -> None:
        resume(self)
        opt = self.engine.optimizer  # DeepSpeed's ZeRO-2 optimizer: this rank's flat partitions
        groups = opt.single_partition_of_fp32_groups
        torch.save(
            {
                "fp32": [g.detach().clone() for g in groups],
                "exp_avg": [opt.optimizer.state[g]["exp_avg"].clone() for g in groups],
                "exp_avg_sq": [opt.optimizer.state[g]["exp_avg_sq"].clone() for g in groups],
                "adam_step": [float(opt.optimizer.state[g]["step"]) for g in groups],
                "step": self.step,
                "sampler": self.sampler.state_dict(),
            },
            Path(out) / f"rank{self.rank}.pt",
        )

    Trainer.resume = probe
    quiet_libraries()
    run_training(config, [])


if __name__ == "__main__":
    main(*sys.argv[1:])
