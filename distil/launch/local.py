"""A run in this process: one local worker, or one rank of a `torchrun` (distil/launch/sequence.py
has the order; this is what a local run does at each step of it)."""

from __future__ import annotations

# Imports inside functions: the training stack (torch, DeepSpeed, transformers) only once the input
# has passed the checks that need none of it: a refused run answers in a second.
import os
import sys
from pathlib import Path

from distil.config.schema import DistilConfig, load_config
from distil.errors import UserError
from distil.launch import sequence
from distil.quiet import quiet_libraries
from distil.runs.metrics_log import summary_lines


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LocalPath:
    """One process of a local run; rank 0 leads (under torchrun, RANK and WORLD_SIZE say which)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.leads = self.rank == 0
        self.run_dir: Path | None = None

    def log(self, message: str) -> None:
        if self.leads:
            _stderr(message)

    def announce(self, message: str) -> None:
        print(message, flush=True)

    def worker_counts(self, cfg: DistilConfig) -> list[int]:
        if cfg.scaling.elastic:
            low, high = cfg.scaling.num_workers
            raise UserError(
                f"scaling.num_workers is the range [{low}, {high}]: an elastic run resizes a Ray Train worker group",
                where="scaling.num_workers",
                fix="run it on Ray (`distil train --ray`, python jobs/distill.py), or give a number of workers",
            )
        return [self.world_size]

    def check_storage(self, cfg: DistilConfig) -> None:
        if cfg.storage_root().is_s3:
            raise UserError(
                "s3:// storage goes through Ray Train's checkpoint storage",
                where="storage.uri",
                fix="run with --ray (python jobs/distill.py), or use a local folder for storage.uri",
            )
        cfg.storage_root().check_writable()
        self.run_dir = cfg.run_storage().local()

    def load(self, cfg: DistilConfig):

        quiet_libraries()
        from distil.train.setup import load_inputs

        return load_inputs(cfg, self.world_size)

    def join(self, inputs) -> None:
        from distil.train.setup import init_distributed

        init_distributed(inputs.device)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def train(self, cfg: DistilConfig, inputs) -> dict:
        from distil.runs.stores import LocalCheckpointStore
        from distil.train.trainer import Trainer

        trainer = Trainer(inputs, self.run_dir, store=LocalCheckpointStore())
        if self.leads:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        trainer.checkpointer.install_signal_handler()
        if self.leads:
            print(
                f"run {cfg.run_name()} -> {self.run_dir} ({len(inputs.train):,} training / {len(inputs.eval):,} held-out "
                f"sequences, {inputs.device.type} {inputs.dtype}, {trainer.world} worker(s))",
                flush=True,
            )
        return trainer.train()

    def finish(self, cfg: DistilConfig, result: dict) -> dict:
        # Every collective is done. A gloo rank that exits with its process group open can abort
        # at interpreter exit (SIGABRT, "terminate called without an active exception":
        # pytorch/pytorch#190489), failing a run that finished; so every rank closes it now.
        self.teardown()
        if result["stopped"]:
            if self.leads:
                print(
                    f"stopped by SIGTERM at step {result['step']}: checkpoint saved in {self.run_dir}; "
                    "run the same command again to resume",
                    flush=True,
                )
            return result
        if self.leads:
            from distil.runs import layout
            from distil.runs.export import export_checkpoint

            model_dir = self.run_dir / "model"
            export_checkpoint(self.run_dir / layout.latest_tag(self.run_dir), model_dir, hashed=True, replace=True)
            result["model_dir"] = str(model_dir)
            print("\n".join(summary_lines(result)), flush=True)
        return result

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_training(config_path: str | None, overrides: list[str], start_over: bool = False) -> dict:
    """`distil train`: validate, prepare, train one local worker (or one torchrun rank), export."""

    return sequence.run(load_config(config_path, overrides), LocalPath(), start_over)
