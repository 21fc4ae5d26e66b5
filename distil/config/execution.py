"""The sections of a run's config that say how it runs: the optimizer and schedule, the steps and
batches, precision, DeepSpeed ZeRO, checkpoints, storage, workers, and the measures taken of the
student beyond its objective. One pydantic model per component, every field with a one-line
description, unknown keys refused (distil/config/sections.py has the base and what is distilled)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distil.config.sections import _Strict
from distil.storage.location import endpoint_url_problem


class OptimSection(_Strict):
    lr: float = Field(5e-4, gt=0.0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-6, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of max_steps (with time_budget_minutes: of the planned steps) with linear warmup from 0.",
    )
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="After warmup: linear decay to 0, or constant."
    )
    grad_clip: float = Field(5.0, ge=0.0, description="Global gradient-norm clip; 0 disables clipping.")

    @model_validator(mode="after")
    def _betas(self) -> "OptimSection":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)}: each must be in [0, 1) (e.g. [0.9, 0.98])")
        return self


class TrainSection(_Strict):
    max_steps: int = Field(ge=1, description="Optimizer steps of the run (with time_budget_minutes: at most).")
    time_budget_minutes: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description=(
            "Wall-clock minutes for the optimizer steps; unset: the run takes max_steps, however long. Set: the run "
            "times its first 36 steps, plans the steps that fit (at most max_steps), decays the learning rate to that "
            "plan and ends there; the plan is saved with every checkpoint, so a resumed run ends at the same step with "
            "the same weights. Evaluations and checkpoint saves come on top (distil/train/budget.py). At most 1,000,000 (1.9 years)."
        ),
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward/backward.")
    global_batch_size: int = Field(
        8, ge=1, description="Sequences per optimizer step over all workers; reached by gradient accumulation."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps; 0: only at the end.")
    progress_bar: bool = Field(True, description="Show a progress bar with ETA on rank 0.")
    tensorboard: bool = Field(
        True, description="Also write metrics as TensorBoard events to RUN/tensorboard in the run's storage."
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the teacher's and the student's transformer layers (Inductor: fewer, fused kernels). "
            "The first steps are slower while it compiles; results agree with eager to float rounding. "
            "Measured effects in bench/RESULTS.md (python -m bench.step --compile)."
        ),
    )


class PrecisionSection(_Strict):
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Training precision; auto: fp16 with dynamic loss scaling on GPUs, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; auto: cuda when available.")
    initial_scale_power: int = Field(16, ge=0, le=32, description="fp16: initial dynamic loss scale is 2^N.")
    loss_scale_window: int = Field(1000, ge=1, description="fp16: steps without overflow before the loss scale grows.")


class ZeroSection(_Strict):
    stage: Literal[0, 1, 2] = Field(
        2, description="DeepSpeed ZeRO stage (2: optimizer state and gradients partitioned)."
    )
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass.")
    contiguous_gradients: bool = Field(
        True, description="Copy gradients into one contiguous buffer as they are produced."
    )
    reduce_bucket_size: int = Field(200_000_000, ge=1, description="Elements per gradient reduce bucket.")
    allgather_bucket_size: int = Field(200_000_000, ge=1, description="Elements per parameter all-gather bucket.")


class CheckpointSection(_Strict):
    every_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps (and always at the end).")
    keep_last: int = Field(
        3, ge=1, description="Checkpoints kept; older ones are deleted once a newer one is complete."
    )
    resume: bool = Field(True, description="Resume from the run's latest complete checkpoint when one exists.")


class StorageSection(_Strict):
    uri: str = Field("runs", description="Where runs are kept: a local folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2); unset: AWS.")
    region: str | None = Field(None, description="S3 region; unset: from the AWS environment/profile.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:

        problem = value is not None and endpoint_url_problem(value)
        if problem:
            raise ValueError(f"the URL {problem}")  # never the value itself: it may hold a password
        return value

    max_attempts: int = Field(
        10,
        ge=1,
        le=30,
        description=(
            "Tries per S3 request of a Ray run (uploads, restores, Ray's own records) with exponential backoff "
            "capped at 20 s: 10 ride out an outage of about a minute; a longer one fails the upload and Ray "
            "restarts the worker group from the last registered checkpoint."
        ),
    )


MAX_WORKERS = 65_536  # a bound on what a config may ask (every count of a range is checked)


class ScalingSection(_Strict):
    num_workers: int | tuple[int, int] = Field(
        1,
        description=(
            "Training workers (one DeepSpeed rank each): a number, or [min, max] for an elastic Ray run -- it starts "
            "with as many as can be placed (at least min), goes on with fewer when a node is lost, and grows back to "
            "max when capacity returns, each resize a restart from the latest checkpoint re-partitioned for the new "
            "count (the global batch, the samples and their order stay those of an uninterrupted run)."
        ),
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description=(
            "An elastic run looks for capacity to grow into this often (Ray Train's "
            "elastic_resize_monitor_interval_s); each growth is a restart from the latest checkpoint, so not much "
            "more often than checkpoints are written. A lost worker shrinks the group at once."
        ),
    )
    worker_group_start_timeout_s: float | None = Field(
        None,
        gt=0,
        le=86400,
        description=(
            "How long Ray Train waits for a worker group's resources to be placed before it tries another size "
            "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; null: that variable if it is set, else Ray's 60 s). After a node "
            "is lost an elastic run first asks for its old size, which cannot be placed: most of the time it trains "
            "nothing is this wait. Lower it (e.g. 20) when workers' pods are up before Ray places workers on them."
        ),
    )
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per worker when use_gpu is set.")
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the latest checkpoint before giving up (-1: unlimited)."
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _range(cls, v):
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"{list(v)} is not a number of workers or a [min, max] range of them, e.g. [2, 8]")
            low, high = v
            if high > MAX_WORKERS:
                raise ValueError(f"[{low}, {high}]: at most {MAX_WORKERS:,} workers")
            if low < 1:
                raise ValueError(f"[{low}, {high}]: an elastic run needs at least 1 worker (min >= 1)")
            if low > high:
                raise ValueError(f"[{low}, {high}]: min is more than max; write [{high}, {low}]")
            return low if low == high else (low, high)  # [n, n] is n workers, fixed
        if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= MAX_WORKERS:
            raise ValueError(f"{v}: a run needs at least 1 worker, and at most {MAX_WORKERS:,}")
        return v

    @property
    def elastic(self) -> bool:
        """A [min, max] range: the worker group resizes with the capacity there is."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def worker_counts(self) -> range:
        """Every worker count the run may train with."""
        return range(self.min_workers, self.max_workers + 1)


class ProbeSection(_Strict):
    """A downstream probe of the student against its teacher (distil/eval/probe.py)."""

    path: str | None = Field(
        None,
        description=("A labelled text table (.tsv/.csv/.jsonl), e.g. data/brown/brown_genres.tsv; unset: no probe."),
    )
    text_column: str = Field("text", description="The column holding the text.")
    label_column: str = Field("label", description="The column holding the class label.")
    group_column: str | None = Field(
        None,
        description=(
            "Rows of one group (e.g. one document) are all on one side of the train/test split; unset: rows split alone."
        ),
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description=(
            "Share of the groups each fold holds out: round(1 / test_fraction) folds, every row predicted once by the "
            "classifier of the fold that held its group out."
        ),
    )
    max_rows: int | None = Field(
        None, ge=10, description="At most this many rows, evenly over the groups (a forward pass each, per model)."
    )
    max_len: int = Field(128, ge=8, description="Tokens per text; longer texts are truncated.")


class EvalSection(_Strict):
    """Measures of the student beyond its training objective, taken at step 0 (the untrained
    student) and at the end of training -- in the metrics, the run's summary and the model card
    -- and by `distil eval`. None of them changes what is trained."""

    sources: list[str] = Field(
        [],
        description=(
            "Text unlike the training text (another domain), never trained on: teacher/student agreement on its first "
            "data.eval_max_sequences sequences, as eval_<file name>/agreement. Local files or s3:// objects."
        ),
    )
    probe: ProbeSection = Field(default_factory=ProbeSection, description="A downstream probe (distil/eval/probe.py).")
