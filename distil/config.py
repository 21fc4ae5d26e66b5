"""The typed configuration of a distillation run.

One pydantic model per component; every field carries a one-line description. A run is
configured from a YAML file plus `--set dotted.key=value` overrides; unknown keys are
errors. The resolved config (every default filled in) is saved with each checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distil.errors import UserError
from distil.paths import is_s3


class _Strict(BaseModel):
    # inf and nan are never a meaningful learning rate, temperature or epsilon.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Keys that may change when a run is resumed (the rest define the run: distil/continuity.py);
# they are left out of the derived run name too, so that changing them continues the run.
# run.name: the run is its folder; a folder copied or renamed (e.g. to try another worker
# count from the same checkpoint) is the same run under another name.
RESUMABLE = ("run.name", "train.max_steps", "train.log_every", "train.eval_every", "train.progress_bar", "train.tensorboard",
             "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume", "data.cache_dir",
             "precision.device", "storage", "scaling")

# Names of keys that hold credentials; such values are never accepted in a config (which is
# saved with every checkpoint and the exported model) -- they come from the environment.
SECRET_KEY = re.compile(r"(?i)(token|secret|passw|credential|private[_-]?key|api[_-]?key|access[_-]?key|(^|[_-])auth($|[_-]))")


class RunSection(_Strict):
    name: str | None = Field(
        None,
        description="Run name: the folder under storage.uri. Unset: derived from a hash of the config, "
        "so running the same command again resumes the same run.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    )
    seed: int = Field(0, ge=0, description="Seed for initialisation, shuffling, masking and dropout.")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value == "data":
            raise ValueError("'data' is where prepared data is kept beside the runs; choose another name")
        return value


class TeacherSection(_Strict):
    name_or_path: str = Field(description="Hugging Face hub id or local folder of the teacher model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the teacher.")


class StudentSection(_Strict):
    layers: list[int] = Field(
        description="Teacher layers (0-based) copied into the student, in order; the student has this many layers.",
        min_length=1,
    )
    architecture: Literal["same", "distilbert"] = Field(
        "same",
        description="'same': the teacher's class with fewer layers; 'distilbert': DistilBertForMaskedLM "
        "(BERT teachers only), as DistilBERT was made.",
    )


class DataSection(_Strict):
    sources: list[str] = Field(
        min_length=1,
        description="Text sources: local .txt/.jsonl/.json/.parquet files or folders, s3:// URIs, or hub data-set names.",
    )
    hub_config: str | None = Field(None, description="Configuration name of a hub data set (e.g. '20231101.en').")
    hub_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for a hub data set (e.g. {lang: pl} for cc100); "
        "never a token: the hub token comes from HF_TOKEN or `hf auth login`."
    )
    text_field: str = Field("text", description="Column holding the text in jsonl/parquet/hub sources.")
    max_len: int = Field(128, ge=8, description="Sequence length in tokens, special tokens included.")
    packing: Literal["pack", "lines"] = Field(
        "pack",
        description="'pack': documents concatenated and cut into full max_len sequences; 'lines': each line or "
        "document is its own sequence (split when longer), as DistilBERT did.",
    )
    min_len: int = Field(12, ge=3, description="In 'lines' packing, sequences shorter than this (in tokens) are dropped.")
    max_documents: int | None = Field(None, ge=1, description="Use only the first N documents (for smoke tests and demos).")
    group_by_length: bool = Field(
        True, description="Batch sequences of similar length together (less padding); only matters for 'lines' packing."
    )
    eval_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="Fraction of sequences held out for evaluation.")
    eval_max_sequences: int = Field(512, ge=0, description="Upper bound on held-out sequences.")
    cache_dir: str | None = Field(None, description="Where a rank caches prepared data read from S3 (and hub data sets are downloaded); unset: ~/.cache/distil.")

    @field_validator("hub_kwargs")
    @classmethod
    def _no_secrets(cls, value: dict) -> dict:
        for key in flat_keys(value):
            if SECRET_KEY.search(key):
                raise ValueError(f"key {key!r} looks like a credential; it would be saved with every checkpoint. "
                                 "Remove it and set HF_TOKEN in the environment (or a Secret in the chart's extraEnv)")
        return value


class MaskingSection(_Strict):
    prob: float = Field(
        0.15, ge=0.0, lt=1.0,
        description="Fraction of eligible tokens chosen as prediction targets; 0 feeds clean text (hidden-state-only objectives).",
    )
    mask_frac: float = Field(0.8, ge=0.0, le=1.0, description="Of the targets, fraction replaced by the mask token.")
    random_frac: float = Field(0.1, ge=0.0, le=1.0, description="Of the targets, fraction replaced by a random token; the rest are kept.")
    smoothing: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Token-count smoothing exponent: targets drawn with probability proportional to count^-smoothing "
        "(DistilBERT/XLM used 0.7); unset: uniform.",
    )
    whole_word: bool = Field(False, description="Mask whole words: all pieces of a chosen word together.")
    word_boundary: Literal["auto", "wordpiece", "charbpe", "sentencepiece", "bytebpe"] = Field(
        "auto",
        description="How word pieces mark words: '##' continuation (wordpiece), '</w>' word end (charbpe), "
        "'▁' word start (sentencepiece), 'Ġ' word start (bytebpe); auto: read from the tokenizer's vocabulary.",
    )

    @model_validator(mode="after")
    def _fractions(self) -> "MaskingSection":
        if self.mask_frac + self.random_frac > 1.0 + 1e-9:
            raise ValueError("mask_frac + random_frac must be at most 1 (the rest of the targets are kept)")
        return self


class LossSection(_Strict):
    recipe: Literal["distilbert", "masked"] = Field(
        "distilbert",
        description="'distilbert': KL, cosine and MSE on every non-pad token, MLM on masked ones (Sanh et al. 2019); "
        "'masked': every loss on masked positions only (as distilHerBERT did).",
    )
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of the KL term; the term is multiplied by T^2.")
    alpha_kl: float = Field(5.0, ge=0.0, description="Weight of KL(teacher || student) on temperature-softened distributions.")
    alpha_mlm: float = Field(2.0, ge=0.0, description="Weight of the masked-LM cross-entropy against the true tokens.")
    alpha_cos: float = Field(1.0, ge=0.0, description="Weight of the cosine embedding loss on last hidden states.")
    alpha_mse: float = Field(0.0, ge=0.0, description="Weight of the MSE between student and teacher logits.")
    alpha_mse_hidden: float = Field(0.0, ge=0.0, description="Weight of the MSE between student and teacher last hidden states.")
    alpha_cos_intermediate: float = Field(
        0.0, ge=0.0, description="Weight of the cosine loss on intermediate hidden states mapped by student.layers."
    )

    @property
    def needs_masks(self) -> bool:
        """Whether a term reads masked positions (then masking.prob must be above 0)."""
        return self.alpha_mlm > 0 or self.recipe == "masked"

    @property
    def needs_logits(self) -> bool:
        """Whether any term reads the LM head's output (else the teacher runs without a head)."""
        return self.alpha_kl > 0 or self.alpha_mlm > 0 or self.alpha_mse > 0

    @model_validator(mode="after")
    def _some_loss(self) -> "LossSection":
        weights = [self.alpha_kl, self.alpha_mlm, self.alpha_cos, self.alpha_mse, self.alpha_mse_hidden, self.alpha_cos_intermediate]
        if not any(w > 0 for w in weights):
            raise ValueError("every loss weight is 0: set at least one alpha_* above 0")
        return self


class OptimSection(_Strict):
    lr: float = Field(5e-4, gt=0.0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-6, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Fraction of max_steps with linear warmup from 0.")
    schedule: Literal["linear", "constant"] = Field("linear", description="After warmup: linear decay to 0, or constant.")
    grad_clip: float = Field(5.0, ge=0.0, description="Global gradient-norm clip; 0 disables clipping.")

    @model_validator(mode="after")
    def _betas(self) -> "OptimSection":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)}: each must be in [0, 1) (e.g. [0.9, 0.98])")
        return self


class TrainSection(_Strict):
    max_steps: int = Field(ge=1, description="Optimizer steps of the run.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward/backward.")
    global_batch_size: int = Field(
        8, ge=1, description="Sequences per optimizer step over all workers; reached by gradient accumulation."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps; 0: only at the end.")
    progress_bar: bool = Field(True, description="Show a progress bar with ETA on rank 0.")
    tensorboard: bool = Field(True, description="Also write metrics as TensorBoard events to RUN/tensorboard in the run's storage.")
    compile: bool = Field(False, description=(
        "torch.compile the teacher's and the student's transformer layers (Inductor: fewer, fused kernels). "
        "The first steps are slower while it compiles; results agree with eager to float rounding. "
        "Measured effects in bench/RESULTS.md (python -m bench.step --compile)."))


class PrecisionSection(_Strict):
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Training precision; auto: fp16 with dynamic loss scaling on GPUs, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; auto: cuda when available.")
    initial_scale_power: int = Field(16, ge=0, le=32, description="fp16: initial dynamic loss scale is 2^N.")
    loss_scale_window: int = Field(1000, ge=1, description="fp16: steps without overflow before the loss scale grows.")


class ZeroSection(_Strict):
    stage: Literal[0, 1, 2] = Field(2, description="DeepSpeed ZeRO stage (2: optimizer state and gradients partitioned).")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass.")
    contiguous_gradients: bool = Field(True, description="Copy gradients into one contiguous buffer as they are produced.")
    reduce_bucket_size: int = Field(200_000_000, ge=1, description="Elements per gradient reduce bucket.")
    allgather_bucket_size: int = Field(200_000_000, ge=1, description="Elements per parameter all-gather bucket.")


class CheckpointSection(_Strict):
    every_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps (and always at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted once a newer one is complete.")
    resume: bool = Field(True, description="Resume from the run's latest complete checkpoint when one exists.")


class StorageSection(_Strict):
    uri: str = Field("runs", description="Where runs are kept: a local folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2); unset: AWS.")
    region: str | None = Field(None, description="S3 region; unset: from the AWS environment/profile.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        from distil.storage import endpoint_url_problem

        problem = value is not None and endpoint_url_problem(value)
        if problem:
            raise ValueError(f"the URL {problem}")  # never the value itself: it may hold a password
        return value
    max_attempts: int = Field(10, ge=1, le=30, description=(
        "Tries per S3 request of a Ray run (uploads, restores, Ray's own records) with exponential backoff "
        "capped at 20 s: 10 ride out an outage of about a minute; a longer one fails the upload and Ray "
        "restarts the worker group from the last registered checkpoint."))


class ScalingSection(_Strict):
    num_workers: int = Field(1, ge=1, description="Training workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per worker when use_gpu is set.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts from the latest checkpoint before giving up (-1: unlimited).")


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
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="Checkpoint cadence and retention.")
    storage: StorageSection = Field(default_factory=StorageSection, description="Where checkpoints and metrics go.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Workers and resources.")

    @model_validator(mode="after")
    def _masking_needed(self) -> "DistilConfig":
        if self.loss.needs_masks and self.masking.prob == 0:
            raise ValueError("masking.prob is 0 but the MLM term or the 'masked' recipe needs masked positions")
        return self

    def check_before_loading(self, world_size: int) -> None:
        """What is wrong with this config for `world_size` workers that shows without the teacher,
        the data or torch: checked first, before seconds of imports (raises UserError)."""
        self.check_batch_split(world_size)
        self.check_teacher_folder()
        self.check_data_sources()

    def check_batch_split(self, world_size: int) -> None:
        """The global batch must be whole micro-batches on every one of `world_size` workers."""
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_step:
            raise UserError(f"global_batch_size {self.train.global_batch_size} is not a multiple of micro_batch_size x "
                            f"workers = {per_step}", where="train.global_batch_size", fix=f"use a multiple of {per_step}")

    def check_teacher_folder(self) -> None:
        """A teacher named as a folder must exist (a hub id is checked when it is loaded)."""
        name = self.teacher.name_or_path
        if looks_local(name) and not Path(name).expanduser().exists():
            raise UserError(f"teacher folder {name} does not exist", where="teacher.name_or_path",
                            fix="point it at a folder saved with save_pretrained, or at a hub id such as bert-base-uncased")

    def check_data_sources(self) -> None:
        """Local data sources must exist (an s3:// prefix or a hub data set is checked when it is listed)."""
        from distil.corpus import is_hub_name

        for source in self.data.sources:
            if not is_s3(source) and not is_hub_name(source) and not Path(source).expanduser().exists():
                raise UserError(f"{source} does not exist", where="data.sources", fix="correct the path")

    def run_name(self) -> str:
        """`run.name`, or a stable name derived from everything that defines the run."""
        if self.run.name:
            return self.run.name
        # Only what defines the run goes into the hash: what may change on a resume doesn't.
        payload = self.model_dump(mode="json")
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
        """The storage of every run and the prepared data (`distil.storage.Storage`)."""
        from distil.storage import Storage

        return Storage.of(self.storage)

    def run_storage(self):
        """The run's folder: STORAGE/RUN_NAME, wherever it is -- the one place it is made."""
        return self.storage_root().child(self.run_name())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def flat_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of every key in nested mappings (and mappings in lists)."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for k, v in items:
        name = f"{prefix}{k}"
        out.append(name)
        out += flat_keys(v, f"{name}.")
    return out


def _format_validation_error(err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check its spelling against configs/ or `distil config --help`)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{loc}: {msg}")
    return UserError("invalid config\n    " + "\n    ".join(lines), where=source, fix="correct the listed keys in the file or in --set")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (3 -> int, [0,1] -> list)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r} is not KEY=VALUE", fix="write it as --set loss.temperature=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {assignment!r}: value is not valid YAML ({e})", fix="quote it, e.g. --set run.name='\"x\"'") from None
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
            raise UserError(f"config file {p} does not exist", fix="pass --config with a path such as configs/demo.yaml")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 text (byte {e.start} cannot be decoded)", where=source,
                            fix="save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise UserError(f"not valid YAML: {e}", where=source) from None
        if not isinstance(data, dict):
            raise UserError("the top level must be a mapping of sections", where=source)
    for o in overrides:
        apply_override(data, o)
    try:
        return DistilConfig.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None
