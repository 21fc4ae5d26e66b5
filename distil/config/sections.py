"""The sections of a run's config that say what is distilled -- the run, the teacher, the student,
the data, the masking and the loss -- and the base they share: one pydantic model per component,
every field with a one-line description, unknown keys refused. How the run runs (optimizer,
steps, precision, ZeRO, checkpoints, storage, scaling, evaluation) is in
distil/config/execution.py; distil/config/schema.py composes them into DistilConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Names of keys that hold credentials (distil/secrets.py): such values are never accepted in a
# config (which is saved with every checkpoint and the exported model); they come from the environment.
from distil.secrets import SECRET_KEY
from distil.storage.paths import is_s3


def flat_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of every key in nested mappings (and mappings in lists)."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for k, v in items:
        name = f"{prefix}{k}"
        out.append(name)
        out += flat_keys(v, f"{name}.")
    return out


def is_hub_name(source: str) -> bool:
    """Whether a data source names a hub data set ("name" or "org/name", not a path that exists,
    not s3://): the one rule for what `data.sources` entries mean."""

    return (
        not is_s3(source)
        and not source.startswith((".", "/", "~"))
        and not Path(source).exists()
        and source.count("/") <= 1
    )


class _Strict(BaseModel):
    # inf and nan are never a meaningful learning rate, temperature or epsilon.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    hidden_size: int | None = Field(
        None,
        ge=8,
        description=(
            "The student's width; unset: the teacher's. A narrower student reads the teacher's hidden states through a "
            "learned projection (kept in checkpoints, dropped at export)."
        ),
    )
    num_attention_heads: int | None = Field(
        None, ge=1, description=("The student's attention heads; unset: the teacher's (they must divide hidden_size).")
    )
    intermediate_size: int | None = Field(
        None,
        ge=8,
        description=(
            "The student's feed-forward width; unset: the teacher's, scaled by hidden_size / the teacher's width."
        ),
    )
    init: Literal["teacher", "random"] = Field(
        "teacher",
        description=(
            "'teacher': copy the chosen teacher layers, embeddings and head (for a narrower student, the same evenly "
            "spaced subset of heads, dimensions and feed-forward units from every tensor: weight selection); "
            "'random': the architecture's own random initialisation (an ablation)."
        ),
    )
    freeze_embeddings: bool = Field(
        False,
        description=(
            "Keep the token embeddings copied from the teacher fixed (and so a tied MLM decoder): words the training "
            "text lacks stay where the teacher put them, and the largest tensor's gradient and Adam update are saved; "
            "needs init 'teacher' and the teacher's width."
        ),
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=(
            "The student's dropout probability (every dropout: embeddings, attention, feed-forward) while it trains; "
            "unset: the teacher's config. The exported config keeps the teacher's, for whoever fine-tunes the student."
        ),
    )

    @model_validator(mode="after")
    def _frozen_from_teacher(self) -> "StudentSection":
        if self.freeze_embeddings and (self.init != "teacher" or self.hidden_size is not None):
            raise ValueError(
                "student.freeze_embeddings keeps the teacher's embeddings: it needs student.init 'teacher' "
                "and no student.hidden_size"
            )
        return self

    @property
    def resized(self) -> bool:
        """Whether any width of the student differs from its teacher's."""
        return any(x is not None for x in (self.hidden_size, self.num_attention_heads, self.intermediate_size))


class DataSection(_Strict):
    sources: list[str] = Field(
        min_length=1,
        description="Text sources: local .txt/.jsonl/.json/.parquet files or folders, s3:// URIs, or hub data-set names.",
    )
    hub_config: str | None = Field(None, description="Configuration name of a hub data set (e.g. '20231101.en').")
    hub_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for a hub data set (e.g. {lang: pl} for cc100); "
        "never a token: the hub token comes from HF_TOKEN or `hf auth login`.",
    )
    text_field: str = Field("text", description="Column holding the text in jsonl/parquet/hub sources.")
    max_len: int = Field(128, ge=8, description="Sequence length in tokens, special tokens included.")
    packing: Literal["pack", "lines"] = Field(
        "pack",
        description="'pack': documents concatenated and cut into full max_len sequences; 'lines': each line or "
        "document is its own sequence (split when longer), as DistilBERT did.",
    )
    min_len: int = Field(
        12, ge=3, description="In 'lines' packing, sequences shorter than this (in tokens) are dropped."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use only the first N documents (for smoke tests and demos)."
    )
    group_by_length: bool = Field(
        True, description="Batch sequences of similar length together (less padding); only matters for 'lines' packing."
    )
    eval_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="Fraction of sequences held out for evaluation.")
    eval_max_sequences: int = Field(512, ge=0, description="Upper bound on held-out sequences.")
    cache_dir: str | None = Field(
        None,
        description="Where a rank caches prepared data read from S3 (and hub data sets are downloaded); unset: ~/.cache/distil.",
    )

    @field_validator("hub_kwargs")
    @classmethod
    def _no_secrets(cls, value: dict) -> dict:
        for key in flat_keys(value):
            if SECRET_KEY.search(key):
                raise ValueError(
                    f"key {key!r} looks like a credential; it would be saved with every checkpoint. "
                    "Remove it and set HF_TOKEN in the environment (or a Secret in the chart's extraEnv)"
                )
        return value


class MaskingSection(_Strict):
    prob: float = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="Fraction of eligible tokens chosen as prediction targets; 0 feeds clean text (hidden-state-only objectives).",
    )
    mask_frac: float = Field(0.8, ge=0.0, le=1.0, description="Of the targets, fraction replaced by the mask token.")
    random_frac: float = Field(
        0.1, ge=0.0, le=1.0, description="Of the targets, fraction replaced by a random token; the rest are kept."
    )
    smoothing: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
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
    temperature: float = Field(
        2.0, gt=0.0, description="Softmax temperature of the KL term; the term is multiplied by T^2."
    )
    alpha_kl: float = Field(
        5.0, ge=0.0, description="Weight of KL(teacher || student) on temperature-softened distributions."
    )
    alpha_mlm: float = Field(2.0, ge=0.0, description="Weight of the masked-LM cross-entropy against the true tokens.")
    alpha_cos: float = Field(1.0, ge=0.0, description="Weight of the cosine embedding loss on last hidden states.")
    alpha_mse: float = Field(0.0, ge=0.0, description="Weight of the MSE between student and teacher logits.")
    alpha_mse_hidden: float = Field(
        0.0, ge=0.0, description="Weight of the MSE between student and teacher last hidden states."
    )
    alpha_cos_intermediate: float = Field(
        0.0, ge=0.0, description="Weight of the cosine loss on intermediate hidden states mapped by student.layers."
    )
    alpha_relation: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of MiniLMv2's self-attention relation distillation: KL between the teacher's and the student's "
            "query-query, key-key and value-value relations (summed), over relation_heads heads; any widths and head counts."
        ),
    )
    relation_heads: int = Field(12, ge=1, description="Relation heads of alpha_relation; they must divide both widths.")
    relation_teacher_layer: int | None = Field(
        None,
        ge=0,
        description=(
            "The teacher layer (0-based) whose relations the student's last layer learns; unset: the teacher's last "
            "(MiniLMv2 found an upper-middle one better for large teachers)."
        ),
    )
    alpha_sentence_mse: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of the MSE between the student's and the teacher's sentence embeddings (mean-pooled last hidden "
            "states), as sentence-transformers distils a model."
        ),
    )
    alpha_similarity: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of the MSE between the two models' in-batch cosine-similarity matrices of sentence embeddings "
            "(what the held-out agreement measures; any widths)."
        ),
    )
    alpha_similarity_corr: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of 1 - the Pearson correlation of those two similarity matrices (off-diagonal entries): the "
            "batch's relations up to an offset and a scale, nearer the rank correlation the agreement reports."
        ),
    )
    alpha_attention: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of TinyBERT's attention-score MSE: each student layer's scores (QK^T / sqrt(d), per head) against "
            "the teacher layer it maps to; needs equal head counts."
        ),
    )

    @property
    def needs_masks(self) -> bool:
        """Whether a term reads masked positions (then masking.prob must be above 0)."""
        return self.alpha_mlm > 0 or self.recipe == "masked"

    @property
    def needs_hidden(self) -> bool:
        """Whether a term compares hidden states (a narrower student then needs its projection)."""
        return (
            self.alpha_cos > 0
            or self.alpha_mse_hidden > 0
            or self.alpha_cos_intermediate > 0
            or self.alpha_sentence_mse > 0
        )

    @property
    def needs_logits(self) -> bool:
        """Whether any term reads the LM head's output (else the teacher runs without a head)."""
        return self.alpha_kl > 0 or self.alpha_mlm > 0 or self.alpha_mse > 0

    @model_validator(mode="after")
    def _some_loss(self) -> "LossSection":
        weights = [
            self.alpha_kl,
            self.alpha_mlm,
            self.alpha_cos,
            self.alpha_mse,
            self.alpha_mse_hidden,
            self.alpha_cos_intermediate,
            self.alpha_relation,
            self.alpha_attention,
            self.alpha_sentence_mse,
            self.alpha_similarity,
            self.alpha_similarity_corr,
        ]
        if not any(w > 0 for w in weights):
            raise ValueError("every loss weight is 0: set at least one alpha_* above 0")
        return self
