"""The typed configuration of a distillation run.

One pydantic model per component; every field carries a one-line description. A run is
configured from a YAML file plus `--set dotted.key=value` overrides; unknown keys are
errors. The resolved config (every default filled in) is saved with each checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from distil.config.execution import (
    CheckpointSection,
    EvalSection,
    OptimSection,
    PrecisionSection,
    ScalingSection,
    StorageSection,
    TrainSection,
    ZeroSection,
)
from distil.config.sections import (
    DataSection,
    LossSection,
    MaskingSection,
    RunSection,
    StudentSection,
    TeacherSection,
    _Strict,
    is_hub_name,
)
from distil.errors import UserError
from distil.secrets import check_tree
from distil.storage.location import Storage
from distil.storage.paths import is_s3

# Keys that may change when a run is resumed (the rest define the run: distil/runs/continuity.py);
# they are left out of the derived run name too, so that changing them continues the run.
# run.name: the run is its folder; a folder copied or renamed (e.g. to try another worker
# count from the same checkpoint) is the same run under another name.
RESUMABLE = (
    "run.name",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.progress_bar",
    "train.tensorboard",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "data.cache_dir",
    "precision.device",
    "storage",
    "scaling",
    "eval",
)

# Keys added after distil-run 0.1, with their defaults: left out of a derived run name when at
# their default, so that a run started by 0.1 keeps its name (and resumes) after an upgrade.
ADDED_SINCE_0_1 = {
    "student.hidden_size": None,
    "student.num_attention_heads": None,
    "student.intermediate_size": None,
    "student.init": "teacher",
    "student.freeze_embeddings": False,
    "student.dropout": None,
    "loss.alpha_relation": 0.0,
    "loss.relation_heads": 12,
    "loss.relation_teacher_layer": None,
    "loss.alpha_attention": 0.0,
    "loss.alpha_sentence_mse": 0.0,
    "loss.alpha_similarity": 0.0,
    "loss.alpha_similarity_corr": 0.0,
    "train.time_budget_minutes": None,
}


def looks_local(name: str) -> bool:
    """Whether a model name means a folder: hub ids are "name" or "org/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


class DistilConfig(_Strict):
    run: RunSection = Field(default_factory=RunSection, description="Run name and seed.")
    teacher: TeacherSection = Field(description="The model to distil.")
    student: StudentSection = Field(description="The student's shape and initialisation.")
    data: DataSection = Field(description="Training text and how it becomes sequences.")
    masking: MaskingSection = Field(default_factory=MaskingSection, description="Dynamic masking.")
    loss: LossSection = Field(default_factory=LossSection, description="The distillation objective.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimizer and learning-rate schedule.")
    train: TrainSection = Field(description="Steps and batch sizes.")
    precision: PrecisionSection = Field(default_factory=PrecisionSection, description="Numeric precision and device.")
    zero: ZeroSection = Field(default_factory=ZeroSection, description="DeepSpeed ZeRO settings.")
    checkpoint: CheckpointSection = Field(
        default_factory=CheckpointSection, description="Checkpoint cadence and retention."
    )
    storage: StorageSection = Field(default_factory=StorageSection, description="Where checkpoints and metrics go.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Workers and resources.")
    eval: EvalSection = Field(
        default_factory=EvalSection, description="Out-of-domain agreement and a downstream probe."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        check_tree(data, "config")  # a UserError naming the keys (never their values), not a ValidationError
        return data

    @model_validator(mode="after")
    def _masking_needed(self) -> "DistilConfig":
        if self.loss.needs_masks and self.masking.prob == 0:
            raise ValueError("masking.prob is 0 but the MLM term or the 'masked' recipe needs masked positions")
        return self

    def check_before_loading(self, world_sizes: int | Iterable[int]) -> None:
        """What is wrong with this config for `world_sizes` workers (an elastic run: every count it
        may have) that shows without the teacher, the data or torch: checked first, before seconds of
        imports (raises UserError)."""
        self.check_batch_split(world_sizes)
        self.check_teacher_folder()
        self.check_data_sources()
        for source in self.eval.sources:
            if not is_s3(source) and not Path(source).expanduser().is_file():
                raise UserError(f"{source} does not exist", where="eval.sources", fix="correct the path")
        if self.eval.probe.path:
            self.check_probe()

    def check_probe(self) -> None:
        """A probe's file must exist, and scikit-learn (the `eval` extra) be installed to fit it."""

        if not Path(self.eval.probe.path).expanduser().is_file():
            raise UserError(
                f"probe file {self.eval.probe.path} does not exist",
                where="eval.probe.path",
                fix="correct the path, or unset it",
            )
        if importlib.util.find_spec("sklearn") is None:
            raise UserError(
                "the downstream probe needs scikit-learn, which is not installed",
                where="eval.probe.path",
                fix="pip install 'distil-run[eval]' (or unset eval.probe.path)",
            )

    def check_batch_split(self, world_sizes: int | Iterable[int]) -> None:
        """The global batch must be whole micro-batches on every one of `world_size` workers, for
        every worker count the run may have (an elastic run: each count of its range)."""
        t = self.train
        counts = [world_sizes] if isinstance(world_sizes, int) else list(world_sizes)
        # (a count above global / micro can never split it: no need to try each one)
        failing = [
            n
            for n in counts
            if n > t.global_batch_size // t.micro_batch_size or t.global_batch_size % (t.micro_batch_size * n)
        ]
        if not failing:
            return
        if len(counts) == 1:
            per_step = t.micro_batch_size * counts[0]
            raise UserError(
                f"global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size x workers = {per_step}",
                where="train.global_batch_size",
                fix=f"use a multiple of {per_step}",
            )
        every = math.lcm(*(t.micro_batch_size * n for n in counts))
        works = -(-t.global_batch_size // every) * every  # the smallest multiple of all of them, at least as large
        failed = set(failing)  # (a list's `in` made this quadratic: 20 s for 65,536 counts)
        splitting = [n for n in counts if n not in failed]

        def listed(ns: list[int]) -> str:
            return ", ".join(str(n) for n in ns[:12]) + (", ..." if len(ns) > 12 else "")

        raise UserError(
            f"global_batch_size {t.global_batch_size} does not split into micro-batches of {t.micro_batch_size} for "
            f"{len(failing)} of the worker counts {counts[0]}..{counts[-1]} an elastic run may have: {listed(failing)}",
            where="train.global_batch_size",
            fix=(f"use a global_batch_size that every count divides, e.g. {works:,}, or " if works < 2**31 else "")
            + f"narrow scaling.num_workers to counts that split it ({listed(splitting) or 'none of these'})",
        )

    def check_teacher_folder(self) -> None:
        """A teacher named as a folder must exist (a hub id is checked when it is loaded)."""
        name = self.teacher.name_or_path
        if looks_local(name) and not Path(name).expanduser().exists():
            raise UserError(
                f"teacher folder {name} does not exist",
                where="teacher.name_or_path",
                fix="point it at a folder saved with save_pretrained, or at a hub id such as bert-base-uncased",
            )

    def check_data_sources(self) -> None:
        """Local data sources must exist (an s3:// prefix or a hub data set is checked when it is listed)."""

        for source in self.data.sources:
            if not is_s3(source) and not is_hub_name(source) and not Path(source).expanduser().exists():
                raise UserError(f"{source} does not exist", where="data.sources", fix="correct the path")

    def run_name(self) -> str:
        """`run.name`, or a stable name derived from everything that defines the run."""
        if self.run.name:
            return self.run.name
        # Only what defines the run goes into the hash: what may change on a resume doesn't.
        payload = self.model_dump(mode="json")
        for key, default in ADDED_SINCE_0_1.items():  # at their defaults: the names runs of 0.1 were given
            section, _, leaf = key.partition(".")
            if payload[section].get(leaf) == default:
                payload[section].pop(leaf)
        for key in RESUMABLE:
            section, _, leaf = key.partition(".")
            if leaf:
                payload[section].pop(leaf, None)
            else:
                payload.pop(section, None)
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
        stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.teacher.name_or_path).name).strip("-").lower() or "teacher"
        return f"{stem[:40]}-{len(self.student.layers)}l-{digest}"

    def storage_root(self):
        """The storage of every run and the prepared data (`distil.storage.location.Storage`)."""

        return Storage.of(self.storage)

    def run_storage(self):
        """The run's folder: STORAGE/RUN_NAME, wherever it is -- the one place it is made."""
        return self.storage_root().child(self.run_name())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = (
            "unknown key (check its spelling against configs/ or `distil config --help`)"
            if e["type"] == "extra_forbidden"
            else e["msg"]
        )
        lines.append(f"{loc}: {msg}")
    return UserError(
        "invalid config\n    " + "\n    ".join(lines),
        where=source,
        fix="correct the listed keys in the file or in --set",
    )


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (3 -> int, [0,1] -> list)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r} is not KEY=VALUE", fix="write it as --set loss.temperature=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:  # (its message would repeat the value, which may be anything)
        raise UserError(
            f"--set {key.strip()}=...: the value is not valid YAML", fix="quote it, e.g. --set run.name='\"x\"'"
        ) from None
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {p!r} is not a section", fix="set a leaf key")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DistilConfig:
    """Read a YAML config, apply `--set` overrides, validate. Raises UserError on bad input."""
    data: dict = {}
    source = "--set"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(
                f"config file {p} does not exist", fix="pass --config with a path such as configs/demo.yaml"
            )
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UserError(
                f"not UTF-8 text (byte {e.start} cannot be decoded)", where=source, fix="save the config as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            raise UserError(f"not valid YAML: {e}", where=source) from None
        if not isinstance(data, dict):
            raise UserError("the top level must be a mapping of sections", where=source)
    for o in overrides:
        apply_override(data, o)
    check_tree(data, source)
    try:
        return DistilConfig.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None
