"""The `distil` command.

    distil train --config configs/demo.yaml [--set loss.temperature=3 ...]   one local worker
    distil train --ray --config ...              Ray Train workers (what jobs/distill.py runs)
    distil export CHECKPOINT_DIR --out DIR
    distil config --config FILE [--set ...]      print the resolved config

Bad input exits with code 2 and one message; nothing is written before the input is checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from distil.errors import EXIT_USAGE, UserError

EXIT_TERMINATED = 128 + 15  # the shell's code for "ended by SIGTERM": not a finished run


def quiet_libraries() -> None:
    """Keep the console for our own progress: libraries speak at warning level and above."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/distil/torch_extensions"))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_training(config_path: str | None, overrides: list[str]) -> dict:
    """Validate, prepare, train one local worker (or this Ray worker), export the final model."""
    from distil.config import load_config

    cfg = load_config(config_path, overrides)
    quiet_libraries()
    from distil.export import export_checkpoint
    from distil.train import Trainer, init_distributed, prepare

    if cfg.storage.uri.startswith("s3://"):
        raise UserError("s3:// storage goes through Ray Train's checkpoint storage", where="storage.uri",
                        fix="run with --ray (python jobs/distill.py), or use a local folder for storage.uri")
    prep = prepare(cfg)
    run_dir = Path(cfg.storage.uri).expanduser() / cfg.run_name()
    init_distributed(prep.device)
    trainer = Trainer(prep, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    trainer.install_signal_handler()
    if trainer.rank == 0:
        print(f"run {cfg.run_name()} -> {run_dir} ({len(prep.train):,} training / {len(prep.eval):,} held-out sequences, "
              f"{prep.device.type} {prep.dtype}, {trainer.world} worker(s))", flush=True)
    result = trainer.train()
    if result["stopped"]:
        if trainer.rank == 0:
            print(f"stopped by SIGTERM at step {result['step']}: checkpoint saved in {run_dir / 'checkpoints'}; "
                  "run the same command again to resume", flush=True)
        return result
    if trainer.rank == 0:
        from distil import checkpoint as ckpt

        model_dir = run_dir / "model"
        if model_dir.exists():
            import shutil

            shutil.rmtree(model_dir)
        export_checkpoint(run_dir / "checkpoints" / ckpt.latest_tag(run_dir / "checkpoints"), model_dir)
        result["model_dir"] = str(model_dir)
        _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    start, end = result["start"], result["end"]
    print(f"done: step {result['step']}, {result['tokens']:,} tokens; model in {result['model_dir']}")
    for key in sorted(end):
        name = key.removeprefix("eval/")
        arrow = "(higher is better)" if name == "agreement" else ""
        print(f"  held-out {name:18s} start {start.get(key, float('nan')):.4f} -> end {end[key]:.4f} {arrow}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distil", description="Knowledge distillation of BERT-family masked LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run (or resume) a distillation"), ("config", "print the resolved config")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", help="YAML config (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set loss.temperature=3 (repeatable)")
        if name == "train":
            p.add_argument("--ray", action="store_true",
                           help="train on Ray (scaling.num_workers workers; RAY_ADDRESS or a local Ray instance)")
    p = sub.add_parser("export", help="write a Hugging Face model folder from a checkpoint folder")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/NAME/checkpoints/step_00000100")
    p.add_argument("--out", required=True, help="new folder for the model")
    args = parser.parse_args(argv)
    try:
        if args.command == "train" and args.ray:
            from distil.config import load_config
            from distil.ray_launcher import launch

            cfg = load_config(args.config, args.overrides)
            quiet_libraries()
            launch(cfg)
        elif args.command == "train":
            if run_training(args.config, args.overrides)["stopped"]:
                return EXIT_TERMINATED
        elif args.command == "config":
            from distil.config import load_config

            cfg = load_config(args.config, args.overrides)
            print(f"# run name: {cfg.run_name()}\n{cfg.to_yaml()}", end="")
        elif args.command == "export":
            quiet_libraries()
            from distil.export import export_checkpoint

            print(json.dumps({"model_dir": str(export_checkpoint(Path(args.checkpoint), Path(args.out)))}))
    except UserError as e:
        print(f"distil: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
