from pathlib import Path

import pytest
from pydantic import BaseModel

from distil.config.schema import DistilConfig, apply_override, load_config
from distil.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_validate(path):
    """Each preset validates, and its derived run name is the teacher's name, the student's
    layer count and a hash of what defines the run (checked against that rule here)."""
    import hashlib
    import json
    import re

    from distil.config.schema import ADDED_SINCE_0_1, RESUMABLE

    cfg = load_config(path)
    if cfg.run.name:
        assert cfg.run_name() == cfg.run.name
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})})
    payload = cfg.model_dump(mode="json")
    for key, default in ADDED_SINCE_0_1.items():
        section, leaf = key.split(".")
        if payload[section].get(leaf) == default:
            del payload[section][leaf]
    for key in RESUMABLE:
        section, _, leaf = key.partition(".")
        payload[section].pop(leaf, None) if leaf else payload.pop(section, None)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9]+", "-", cfg.teacher.name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    assert cfg.run_name() == f"{stem}-{len(cfg.student.layers)}l-{digest}"


def test_distilbert_preset_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "distilbert-base-uncased.yaml")
    assert cfg.teacher.name_or_path == "bert-base-uncased"
    assert cfg.student.layers == [0, 2, 4, 7, 9, 11]
    loss, o = cfg.loss, cfg.optim
    assert (loss.recipe, loss.temperature, loss.alpha_kl, loss.alpha_mlm, loss.alpha_cos) == (
        "distilbert",
        2.0,
        5.0,
        2.0,
        1.0,
    )
    assert (cfg.masking.prob, cfg.masking.mask_frac, cfg.masking.random_frac, cfg.masking.smoothing) == (
        0.15,
        0.8,
        0.1,
        0.7,
    )
    assert (o.lr, o.betas, o.eps, o.warmup_ratio, o.schedule, o.grad_clip) == (
        5e-4,
        (0.9, 0.98),
        1e-6,
        0.05,
        "linear",
        5.0,
    )
    assert cfg.train.global_batch_size == 4096 and cfg.data.max_len == 512


def test_herbert_preset_uses_whole_word_charbpe():
    cfg = load_config(ROOT / "configs" / "distilherbert-base.yaml")
    assert cfg.teacher.name_or_path == "allegro/herbert-base-cased"
    assert cfg.masking.whole_word and cfg.masking.word_boundary == "charbpe"
    assert cfg.student.layers == [0, 2, 4, 6, 8, 10]
    assert cfg.loss.recipe == "masked"


def test_minilm_preset_is_minilm_shaped_and_valid_for_bert_base(monkeypatch):
    from transformers import BertConfig

    from distil.model.student_shape import StudentShape
    from distil.model.teacher import validate_against_teacher

    cfg = load_config(ROOT / "configs" / "minilm-l6-h384-uncased.yaml")
    bert_base = BertConfig(architectures=["BertForMaskedLM"])  # 12 x 768, 12 heads, feed-forward 3072
    monkeypatch.setattr("distil.model.teacher.check_teacher_weights", lambda cfg: None)
    validate_against_teacher(cfg, bert_base)
    assert StudentShape.for_student(cfg.student, bert_base) == StudentShape(hidden=384, heads=12, intermediate=1536)
    assert len(cfg.student.layers) == 6 and cfg.loss.alpha_relation == 1.0 and cfg.loss.relation_heads == 12
    assert (ROOT / cfg.eval.probe.path).is_file()


def test_run_names_of_0_1_are_kept():
    """Derived names as distil-run 0.1 computed them (keys added since, at their defaults, are
    left out of the hash): an upgraded distil-run resumes the same run."""
    assert (
        load_config(ROOT / "configs" / "distilbert-base-uncased.yaml").run_name() == "bert-base-uncased-6l-c67ff94b10"
    )
    assert (
        load_config(ROOT / "configs" / "distilbert-base-uncased.yaml", ["student.init=random"]).run_name()
        != "bert-base-uncased-6l-c67ff94b10"
    )


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["loss.temperature=3", "student.layers=[1, 3]", "run.name=x1"])
    assert cfg.loss.temperature == 3.0 and cfg.student.layers == [1, 3] and cfg.run.name == "x1"


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(ROOT / "configs" / "demo.yaml", ["loss.temprature=3"])
    assert "loss.temprature" in str(e.value) and "unknown key" in str(e.value)


def test_invalid_value_names_the_key():
    with pytest.raises(UserError) as e:
        load_config(ROOT / "configs" / "demo.yaml", ["masking.prob=1.5"])
    assert "masking.prob" in str(e.value)


def test_fractions_must_leave_room():
    with pytest.raises(UserError, match="mask_frac"):
        load_config(ROOT / "configs" / "demo.yaml", ["masking.mask_frac=0.95", "masking.random_frac=0.1"])


def test_bad_override_syntax():
    data = {}
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_override(data, "loss.temperature")
    apply_override(data, "a.b.c=[1, 2]")
    assert data == {"a": {"b": {"c": [1, 2]}}}


def test_run_name_is_deterministic_and_ignores_scaling():
    a = load_config(ROOT / "configs" / "demo.yaml", ["run.name=null"])
    b = load_config(ROOT / "configs" / "demo.yaml", ["run.name=null", "scaling.num_workers=4", "train.log_every=1"])
    c = load_config(ROOT / "configs" / "demo.yaml", ["run.name=null", "loss.temperature=4"])
    assert a.run_name() == b.run_name() != c.run_name()
    assert a.run_name().startswith("all-minilm-l6-v2-3l-")


def _fields(model: type[BaseModel], prefix=""):
    for name, f in model.model_fields.items():
        yield f"{prefix}{name}", f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")


def test_every_field_is_described():
    missing = [n for n, f in _fields(DistilConfig) if not (f.description and f.description.strip())]
    assert missing == []


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg
