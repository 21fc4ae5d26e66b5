"""The `distil` command.

    distil train --config configs/demo.yaml [--set loss.temperature=3 ...]   one local worker
    distil train --ray --config ...              Ray Train workers (what jobs/distill.py runs)
    distil export CHECKPOINT_DIR --out DIR
    distil prepare --config ...                  tokenize the run's data once (training does it on first use)
    distil config --config FILE [--set ...]      print the resolved config
    distil check --config FILE [--set ...]       validate it and reach its storage
    distil checkpoints list URI                  runs and checkpoints in a folder or s3://bucket/prefix
    distil checkpoints pull URI --out DIR        a checkpoint -> a Hugging Face model folder
    distil eval MODEL_DIR                        student vs teacher on held-out masked text
    distil plot URI --out run.png                a run's metrics over steps
    distil k8s submit|status|resume              RayJobs on a cluster with KubeRay, without Helm

Bad input exits with code 2 and one message; nothing is written before the input is checked.
"""

from __future__ import annotations

# Imports inside functions: each verb imports only its own room, so that `distil config`, `--help`
# and a refused command answer without loading torch, Ray or transformers.
import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from distil.config.schema import load_config
from distil.data.prepared import data_storage, ensure_prepared
from distil.errors import EXIT_USAGE, UserError
from distil.launch import chart, k8s
from distil.launch.local import run_training
from distil.quiet import quiet_libraries, result_only_on_stdout
from distil.storage.location import Storage

EXIT_TERMINATED = 128 + 15  # the shell's code for "ended by SIGTERM": not a finished run


def _version() -> str:

    try:
        return f"{version('distil-run')} (distil-run)"
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (distil-run, not installed)"


def _config_args(
    p, example: str = "loss.temperature=3", required: bool = False, help_: str = "YAML config (see configs/)"
) -> None:
    """--config and the repeatable --set of every command that reads a run's config."""
    p.add_argument("--config", "-c", required=required, help=help_)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one key, e.g. --set {example} (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distil", description="Knowledge distillation of BERT-family masked LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run (or resume) a distillation"), ("config", "print the resolved config")):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        if name == "train":
            p.add_argument(
                "--ray",
                action="store_true",
                help="train on Ray (scaling.num_workers workers; RAY_ADDRESS or a local Ray instance)",
            )
            p.add_argument(
                "--start-over",
                action="store_true",
                help="start the run from step 0: its existing folder (checkpoints, metrics, model) is moved "
                "aside to RUN.replaced-<UTC time>, never mixed with the new one",
            )
    p = sub.add_parser(
        "prepare",
        help="tokenize the run's data once into STORAGE/data/<fingerprint>/ (training does it on "
        "first use; this does it ahead, e.g. on a CPU cluster)",
    )
    _config_args(p, "data.max_len=256")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--ray",
        action="store_true",
        help="read and tokenize as Ray Data tasks over the Ray cluster in "
        "RAY_ADDRESS, or a local Ray instance (default for sources over 64 MB)",
    )
    where.add_argument("--in-process", action="store_true", help="read and tokenize in this process")
    p.add_argument("--workers", type=int, help="with Ray: at most this many tasks at once (default: every CPU)")
    p = sub.add_parser(
        "check",
        help="check a run's config and reach its storage (a marker written, read and deleted), "
        "as a run does before it starts; the chart's `helm test` runs it in the cluster",
    )
    _config_args(p)
    p = sub.add_parser("export", help="write a Hugging Face model folder from a checkpoint folder")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/NAME/step_00000100")
    p.add_argument("--out", required=True, help="new folder for the model")
    _add_data_and_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train" and args.ray:
            from distil.launch.ray_job import launch

            cfg = load_config(args.config, args.overrides)
            launch(cfg, start_over=args.start_over)
        elif args.command == "train":
            if run_training(args.config, args.overrides, start_over=args.start_over)["stopped"]:
                return EXIT_TERMINATED
        elif args.command == "prepare":
            _prepare(args)
        elif args.command == "check":
            cfg = load_config(args.config, args.overrides)
            cfg.check_before_loading(cfg.scaling.worker_counts())
            cfg.storage_root().check_writable()
            print(f"run {cfg.run_name()}: the config is valid and {cfg.storage.uri} can be written", flush=True)
        elif args.command == "config":
            cfg = load_config(args.config, args.overrides)
            print(f"# run name: {cfg.run_name()}\n{cfg.to_yaml()}", end="")
        elif args.command == "export":
            with result_only_on_stdout():
                quiet_libraries()
                from distil.runs.export import export_checkpoint

                model_dir = export_checkpoint(Path(args.checkpoint), Path(args.out))
            print(json.dumps({"model_dir": str(model_dir)}))
        else:
            _run_data_and_cluster_command(args)
    except UserError as e:
        print(f"distil: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _prepare(args) -> None:

    cfg = load_config(args.config, args.overrides)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be 1 or more", where="--workers")
    quiet_libraries()
    from distil.model.teacher import load_teacher_config, load_tokenizer, validate_against_teacher

    validate_against_teacher(cfg, load_teacher_config(cfg))
    per_step = cfg.train.global_batch_size  # (what one step trains)
    manifest = ensure_prepared(
        cfg,
        load_tokenizer(cfg),
        per_step,
        log=lambda m: print(m, flush=True),
        use_ray=True if args.ray else False if args.in_process else None,
        workers=args.workers,
    )
    m = manifest["splits"]
    print(
        f"prepared data {manifest['fingerprint']}: {m['train']['sequences']:,} training sequences "
        f"({m['train']['tokens']:,} tokens), {m['eval']['sequences']:,} held-out, in {data_storage(cfg, manifest['fingerprint']).uri}",
        flush=True,
    )


def _storage_args(p) -> None:
    p.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); credentials from the AWS environment/profile"
    )
    p.add_argument("--region", help="S3 region")


def _add_data_and_cluster_commands(sub) -> None:
    """checkpoints list/pull, eval, k8s, plot."""
    ck = sub.add_parser("checkpoints", help="list or pull checkpoints in a folder or object storage")
    cks = ck.add_subparsers(dest="action", required=True)
    p = cks.add_parser("list", help="runs and their checkpoints: step, tokens, loss, time, size, complete")
    p.add_argument("uri", help="a local folder or s3://bucket/prefix (storage root, one run, or one checkpoint)")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every file's sha256 (what a resume, export or pull "
        "checks; reads every byte, from S3 too); without it, sizes only",
    )
    _storage_args(p)
    p = cks.add_parser("pull", help="download a checkpoint and write a Hugging Face model folder")
    p.add_argument("uri", help="the run: a local folder or s3://bucket/prefix/RUN")
    p.add_argument("--out", required=True, help="new folder to create")
    p.add_argument("--step", default="latest", help="a step number, or latest (the newest complete checkpoint)")
    p.add_argument("--raw", action="store_true", help="keep the DeepSpeed checkpoint as it is (no fp32 merge)")
    p.add_argument("--cache-dir", help="where downloads are staged and resumed (default ~/.cache/distil/pull)")
    p.add_argument("--keep-cache", action="store_true", help="keep the downloaded checkpoint in the cache")
    p.add_argument("--workers", type=int, default=8, help="parallel ranged downloads")
    _storage_args(p)
    p = sub.add_parser("eval", help="MLM loss/accuracy of a student and its teacher, and their agreement")
    p.add_argument("model", help="the student: a model folder from `distil checkpoints pull` or `distil export`")
    p.add_argument("--teacher", help="teacher folder or hub name (default: the run's teacher)")
    p.add_argument("--data", nargs="+", help="text to evaluate on (default: the run's held-out split)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's config, e.g. --set masking.prob=0.2",
    )
    p.add_argument("--max-sequences", type=int, default=512, help="evaluate on at most this many sequences")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--probe",
        help="a labelled .tsv/.csv/.jsonl for a downstream probe (default: the run's eval.probe.path), "
        "e.g. data/brown/brown_genres.tsv",
    )
    p.add_argument(
        "--text-column", help="the probe's text column (default: the run's eval.probe.text_column, else 'text')"
    )
    p.add_argument("--label-column", help="the probe's label column (default: the run's, else 'label')")
    p.add_argument("--group-column", help="rows of one group stay on one side of the probe's split (e.g. text_id)")
    p.add_argument("--probe-rows", type=int, help="use at most this many rows of the probe, evenly over its groups")
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="leave out the run's probe (its end-of-run summary and model "
        "card already hold what it measured at the last step)",
    )
    _add_k8s_commands(sub)
    p = sub.add_parser("plot", help="draw a run's metrics (loss terms, held-out, lr, tokens/s) to a PNG")
    p.add_argument("uri", help="a run folder or s3://bucket/prefix/RUN")
    p.add_argument("--out", required=True, help="the PNG to write")
    _storage_args(p)


def _add_k8s_commands(sub) -> None:
    k = sub.add_parser("k8s", help="submit, follow and resume runs as KubeRay RayJobs (without Helm)")
    ks = k.add_subparsers(dest="action", required=True)
    p = ks.add_parser(
        "submit", help="render the Helm chart for the run (helm template) and create its ConfigMap and RayJob"
    )
    _config_args(p, "train.max_steps=1000", required=True, help_="the run's YAML config (storage.uri must be s3://)")
    p.add_argument("--image", required=True, help="image with distil-run installed (see Dockerfile)")
    p.add_argument("--workers", type=int, default=1, help="worker pods (an elastic run: the most)")
    p.add_argument(
        "--min-workers",
        type=int,
        help="an elastic run: the fewest worker pods it goes on with when spot nodes vanish (default: --workers)",
    )
    p.add_argument("--queue", default="", help="Kueue LocalQueue of the RayJob (label kueue.x-k8s.io/queue-name)")
    p.add_argument("--priority-class", default="", help="Kueue WorkloadPriorityClass of the run")
    p.add_argument(
        "--disruption-budget",
        action="store_true",
        help="a PodDisruptionBudget: voluntary drains take one training pod at a time",
    )
    p.add_argument("--gpus-per-pod", type=int, default=1, help="GPUs per worker pod (one training worker each)")
    p.add_argument("--cpu", default="8", help="CPU per worker pod")
    p.add_argument("--memory", default="48Gi", help="memory per worker pod")
    p.add_argument("--shm-size", default="16Gi", help="memory-backed /dev/shm per worker pod")
    p.add_argument("--credentials-secret", help="existing Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    p.add_argument("--backoff-limit", type=int, default=3, help="resubmissions of a failed run (each resumes)")
    p.add_argument("--grace-period", type=int, default=300, help="terminationGracePeriodSeconds of the pods")
    p.add_argument("--service-account", help="ServiceAccount of the pods (e.g. one with IRSA for S3)")
    p.add_argument("--chart", help="the distil-run Helm chart to render (default: the one installed with distil-run)")
    p.add_argument("--dry-run", action="store_true", help="print the objects as YAML instead of creating them")
    status = ks.add_parser("status", help="job, cluster and pod state, and the latest checkpoint")
    status.add_argument("--json", action="store_true", help="print JSON")
    resume = ks.add_parser(
        "resume", help="re-create a RayJob that ended (e.g. out of retries): it resumes from storage"
    )
    resume.add_argument(
        "--workers",
        type=int,
        help="worker pods of the resumed job (default: as before); its ZeRO-2 state "
        "is re-partitioned for the new count",
    )
    for q in (status, resume):
        q.add_argument("run", help="the run name (run.name, or the name `distil config` prints)")
    for q in (p, status, resume):
        q.add_argument("--namespace", "-n", default="default", help="the run's namespace (default: default)")
        q.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or ~/.kube/config)")
        q.add_argument("--context", help="kubeconfig context")


def _run_k8s_command(args) -> None:

    if args.action == "submit":
        cfg = load_config(args.config, args.overrides)
        values = chart.submit_values(
            cfg,
            args.image,
            args.workers,
            args.gpus_per_pod,
            args.cpu,
            args.memory,
            args.shm_size,
            args.credentials_secret,
            args.backoff_limit,
            args.grace_period,
            args.service_account,
            min_workers=args.min_workers,
            queue=args.queue,
            priority_class=args.priority_class,
            disruption_budget=args.disruption_budget,
        )
        objs = chart.render_chart(values, args.namespace, args.chart and Path(args.chart))
        if args.dry_run:
            print(yaml.safe_dump_all(objs, sort_keys=False), end="")
            return
        name = k8s.submit(k8s.clients(args.kubeconfig, args.context), objs)
        print(f"RayJob {args.namespace}/{name} created; follow it with `distil k8s status {name} -n {args.namespace}`")
    elif args.action == "status":
        report = k8s.status(k8s.clients(args.kubeconfig, args.context), args.namespace, args.run)
        print(json.dumps(report) if args.json else "\n".join(f"{k:18s} {v}" for k, v in report.items()))
    else:
        name = k8s.resume(k8s.clients(args.kubeconfig, args.context), args.namespace, args.run, workers=args.workers)
        print(f"RayJob {args.namespace}/{name} re-created: it resumes from the run's latest checkpoint")


def _run_data_and_cluster_command(args) -> None:
    if args.command == "k8s":
        _run_k8s_command(args)
    elif args.command == "checkpoints" and args.action == "list":
        from distil.runs.catalog import format_table, list_checkpoints, verify_checkpoint

        storage = Storage(args.uri, args.endpoint_url, args.region)
        infos = list_checkpoints(storage)
        for c in infos if args.verify else []:
            if c.complete:
                c.problem = verify_checkpoint(storage, c)
                c.verified, c.complete = c.problem is None, c.problem is None
        if args.json:
            for c in infos:
                print(json.dumps(c.row()))
        else:
            print(format_table(infos) if infos else f"no checkpoints under {args.uri}")
            if infos and not args.verify:
                print(
                    "(complete: COMPLETE and every file of its manifest present at its size; --verify checks each "
                    "file's sha256 too)"
                )
    elif args.command == "checkpoints":
        from distil.runs.pull import pull  # (it quiets the libraries itself, once it needs them)

        with result_only_on_stdout():
            pulled = pull(
                args.uri,
                Path(args.out),
                step=args.step,
                raw=args.raw,
                endpoint_url=args.endpoint_url,
                region=args.region,
                cache=args.cache_dir and Path(args.cache_dir),
                workers=args.workers,
                keep_cache=args.keep_cache,
            )
        print(json.dumps(pulled))
    elif args.command == "eval":
        with result_only_on_stdout():
            quiet_libraries()
            from distil.eval.compare import evaluate_models, format_report

            probe = {
                "path": args.probe,
                "text_column": args.text_column,
                "label_column": args.label_column,
                "group_column": args.group_column,
                "max_rows": args.probe_rows,
            }
            if args.no_probe and args.probe:
                raise UserError(
                    "--probe and --no-probe ask for opposite things", where="distil eval", fix="give one of them"
                )
            overrides = [*args.overrides, "eval.probe.path=null"] if args.no_probe else args.overrides
            report = evaluate_models(
                args.model, args.teacher, args.data, overrides, args.max_sequences, args.batch_size, probe=probe
            )
        print(json.dumps(report) if args.json else format_report(report))
    elif args.command == "plot":
        from distil.eval.plot import plot

        drawn = plot(args.uri, Path(args.out), args.endpoint_url, args.region)
        print(f"{args.out}: {', '.join(drawn)}")


if __name__ == "__main__":
    sys.exit(main())
