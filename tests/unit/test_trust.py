"""Issue 14 at unit level: the path rule, verified checkpoints, one run per name, secrets and
config values. (CLI journeys: tests/integration/test_trust_cli.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distil.config.schema import DistilConfig, load_config
from distil.errors import UserError
from distil.runs import continuity
from distil.runs import layout as ckpt
from distil.storage import integrity
from distil.storage.paths import check_relative, remove_tree, safe_join
from tests.conftest import ROOT, fake_checkpoint

# -- one safe path rule ----------------------------------------------------------------------

KEY_PARTS = st.sampled_from(["a", "b", "..", ".", "", "step_00000001", "COMPLETE", "/", "\\", "x y", "é", "~", "..a"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(KEY_PARTS, min_size=0, max_size=6), sep=st.sampled_from(["/", "//"]), text=st.text(max_size=12))
def test_safe_join_stays_below_its_root_or_refuses(tmp_path, parts, sep, text):
    """Any key either maps to a path strictly below root, spelled only one way, or is refused."""
    for key in (sep.join(parts), text, sep.join(parts) + text):
        root = tmp_path / "root"
        try:
            joined = safe_join(root, key)
        except UserError as e:
            assert "fix:" in str(e)
            continue
        assert os.path.normpath(joined) == str(joined)  # no '..', '.', '//' left to resolve
        assert joined != root and Path(os.path.normpath(joined)).is_relative_to(root)
        assert PurePosixPath(key).parts == joined.relative_to(root).parts


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\..\\b", "a/\x00"])
def test_hostile_keys_are_refused_by_name(key):
    with pytest.raises(UserError) as e:
        check_relative(key)
    assert repr(key) in str(e.value)


def test_remove_tree_only_below_its_root(tmp_path):
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    cache = tmp_path / "cache"
    (cache / "b").mkdir(parents=True)
    (cache / "link").symlink_to(victim)
    for path in (victim, cache / ".." / "victim", cache / "link", cache):
        with pytest.raises(UserError):
            remove_tree(path, cache)
    assert (victim / "keep").is_dir()
    remove_tree(cache / "b", cache)
    assert not (cache / "b").exists()


# -- checkpoints are verified before use -----------------------------------------------------


def _checkpoint(root: Path, step: int, **extra: bytes) -> Path:
    files = {
        "model.pt": os.urandom(4096),
        "optim.pt": os.urandom(8192),
        ckpt.TRAINER_STATE: json.dumps({"step": step}).encode(),
        **extra,
    }
    return fake_checkpoint(root, ckpt.tag_for(step), files)


def _resume(root: Path, log=print):
    """The one resume decision (distil/runs/checkpointer.py) over a run folder."""
    from distil.runs.checkpointer import find_resume
    from distil.runs.stores import LocalCheckpointStore

    return find_resume(_demo(), LocalCheckpointStore(), root, log)


def _flip(path: Path, offset: int = 100, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


DAMAGES = {
    "64 flipped bytes": (lambda d: _flip(d / "optim.pt"), "optim.pt: sha256 differs"),
    "truncated": (
        lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:100]),
        "model.pt: 100 bytes, expected 4096",
    ),
    "missing file": (lambda d: (d / "optim.pt").unlink(), "optim.pt: missing"),
    "COMPLETE not JSON": (lambda d: (d / ckpt.COMPLETE).write_text("{not json"), "COMPLETE is not valid JSON"),
    "COMPLETE binary": (lambda d: (d / ckpt.COMPLETE).write_bytes(b"\xff\xfe\x00"), "COMPLETE is not valid JSON"),
    "COMPLETE of another step": (
        lambda d: (d / ckpt.COMPLETE).write_text((d / ckpt.COMPLETE).read_text().replace('"step": 6', '"step": 9')),
        "COMPLETE says step 9",
    ),
    "trainer_state step edited": (
        lambda d: (d / ckpt.TRAINER_STATE).write_text('{"step": 9}'),
        "trainer_state.json: sha256 differs",
    ),
    "trainer_state empty": (lambda d: (d / ckpt.TRAINER_STATE).write_text(""), "trainer_state.json: 0 bytes"),
    "file replaced by a link": (
        lambda d: ((d / "optim.pt").unlink(), (d / "optim.pt").symlink_to(d / "model.pt")),
        "optim.pt: is a symbolic link",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_newest_checkpoint_is_named_and_passed_over(tmp_path, case):
    damage, expected = DAMAGES[case]
    root = tmp_path / "checkpoints"
    _checkpoint(root, 3)
    newest = _checkpoint(root, 6)
    (root / ckpt.LATEST).write_text("step_00000006")
    assert ckpt.damage(newest) is None and _resume(root) == ("step_00000006", [])
    damage(newest)
    assert expected in ckpt.damage(newest)
    warnings: list[str] = []
    assert _resume(root, warnings.append) == ("step_00000003", ["step_00000006"])
    assert any("checkpoint step_00000006 is damaged" in w and expected in w for w in warnings), warnings


def test_trainer_state_disagreeing_with_complete_is_damage(tmp_path):
    """Even with a manifest that matches it (re-hashed by whoever edited it)."""
    d = fake_checkpoint(tmp_path, "step_00000011", {ckpt.TRAINER_STATE: b'{"step": 31}'})
    assert "trainer_state.json says step 31, COMPLETE 11" in ckpt.damage(d)


def test_every_checkpoint_damaged_is_one_message(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        _flip(_checkpoint(root, step) / "model.pt")
    with pytest.raises(UserError) as e:
        _resume(root, lambda _: None)
    assert "is damaged (step_00000003: model.pt: sha256 differs" in str(e.value) and "--start-over" in str(e.value)
    assert "; step_00000006: model.pt: sha256 differs" in str(e.value)


def test_hashing_runs_in_parallel_and_agrees_with_hashlib(tmp_path, monkeypatch):
    import hashlib

    d = _checkpoint(tmp_path, 1, **{f"shard_{i}.pt": os.urandom(100_000 + i) for i in range(16)})
    manifest = ckpt.read_complete(d)["files"]
    assert all(v["sha256"] == hashlib.sha256((d / k).read_bytes()).hexdigest() for k, v in manifest.items())
    _flip(d / "shard_7.pt")
    monkeypatch.setattr(integrity, "HASH_THREADS", 4)
    assert integrity.verify(d, manifest) == {"shard_7.pt": "sha256 differs from the manifest"}


def test_pruning_deletes_complete_first(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted must leave it incomplete, never 'complete with
    6 of its 10 files'."""
    root = tmp_path / "checkpoints"
    old = _checkpoint(root, 3)
    _checkpoint(root, 6)
    state = {"step": 9, "world_size": 1, "tokens": 1, "sampler": {}}
    (root / "step_00000009").mkdir()

    def killed_midway(path, *a, **k):
        next(p for p in Path(path).iterdir() if p.name != ckpt.COMPLETE).unlink()
        raise KeyboardInterrupt  # the process dies after deleting one file

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.finalize(root, "step_00000009", state, "run: {}\n", keep_last=2, manifest={}, summary={})
    assert not ckpt.is_complete(old) and ckpt.complete_tags(root) == ["step_00000006", "step_00000009"]


def test_rank_state_is_loaded_as_data_only(tmp_path):
    """rank_N.pt is unpickled with weights_only: a pickle that would run code is refused."""
    import pickle

    import torch

    ckpt.save_rank_state(tmp_path, 0)
    assert ckpt.load_rank_state(tmp_path, 0)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"rng": Boom()}, tmp_path / "rank_00001.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rank_state(tmp_path, 1)
    assert not (tmp_path / "pwned").exists()


# -- a run is one run --------------------------------------------------------------------------


def _demo(*overrides: str) -> DistilConfig:
    """The demo's config with the values these tests name pinned (the demo's own are tuned)."""
    pinned = ["train.max_steps=120", "checkpoint.every_steps=60", "optim.lr=1e-3", "student.layers=[0, 2, 4]"]
    return load_config(ROOT / "configs" / "demo.yaml", pinned + list(overrides))


def test_resume_keys_pass_and_others_are_refused_with_the_diff():
    saved = _demo().to_yaml()
    allowed = continuity.check_continuation(
        _demo(
            "train.max_steps=500",
            "scaling.num_workers=2",
            "storage.max_attempts=3",
            "checkpoint.every_steps=7",
            "train.progress_bar=false",
        ),
        saved,
        "ck",
    )
    assert allowed == [
        "checkpoint.every_steps: 60 -> 7",
        "scaling.num_workers: 1 -> 2",
        "storage.max_attempts: 10 -> 3",
        "train.max_steps: 120 -> 500",
        "train.progress_bar: True -> False",
    ]
    with pytest.raises(UserError) as e:
        continuity.check_continuation(_demo("optim.lr=5e-4", "student.layers=[0, 1, 2]"), saved, "ck")
    msg = str(e.value)
    assert "optim.lr: 0.001 -> 0.0005" in msg and "student.layers: [0, 2, 4] -> [0, 1, 2]" in msg
    assert e.value.where == "run.name" and "new run.name" in msg


def test_unnamed_runs_keep_their_name_when_only_resumable_keys_change():
    base = _demo("run.name=null")
    assert _demo("run.name=null", "train.max_steps=999", "checkpoint.keep_last=9").run_name() == base.run_name()
    assert _demo("run.name=null", "optim.lr=5e-4").run_name() != base.run_name()


def test_finished_run_and_fresh_start_over_checkpoints(tmp_path):
    at = [f"storage.uri={tmp_path}", "run.name=demo"]
    cfg = _demo(*at)
    run_dir = tmp_path / "demo"
    fake_checkpoint(
        run_dir, "step_00000120", {"config.yaml": cfg.to_yaml().encode(), ckpt.TRAINER_STATE: b'{"step": 120}'}
    )
    seen = continuity.check(cfg, print)
    assert seen.newest == "step_00000120" and "already finished" in seen.finished and "step 120" in seen.finished
    seen = continuity.check(_demo(*at, "train.max_steps=200"), print)
    assert seen.newest == "step_00000120" and seen.finished is None
    with pytest.raises(UserError, match=r"checkpoint.resume is false .*\(newest: step_00000120\)"):
        continuity.check(_demo(*at, "checkpoint.resume=false"), print)


def test_a_damaged_last_checkpoint_does_not_finish_the_run(tmp_path):
    """The preview hashes the checkpoint it would call final: damaged, the run has steps to train
    again, from the checkpoint before it, which the one resume decision then picks."""
    at = [f"storage.uri={tmp_path}", "run.name=demo"]
    cfg = _demo(*at)
    _checkpoint(tmp_path / "demo", 60, **{"config.yaml": cfg.to_yaml().encode()})
    _flip(_checkpoint(tmp_path / "demo", 120, **{"config.yaml": cfg.to_yaml().encode()}) / "model.pt")
    said: list[str] = []
    seen = continuity.check(cfg, said.append)
    assert seen.newest == "step_00000120" and seen.finished is None
    assert any("step_00000120 is damaged (model.pt: sha256 differs" in m for m in said), said
    assert _resume(tmp_path / "demo", lambda _: None) == ("step_00000060", ["step_00000120"])


def test_the_resumed_checkpoint_must_continue_this_config(tmp_path):
    """The checkpoint the run resumes from is compared with the config, whichever store offers it."""
    other = _demo("optim.lr=5e-4").to_yaml().encode()
    _checkpoint(tmp_path, 6, **{"config.yaml": other})
    with pytest.raises(UserError, match=r"optim.lr: 0.0005 -> 0.001"):
        _resume(tmp_path)
    _checkpoint(tmp_path, 9, **{"config.yaml": _demo("train.max_steps=500").to_yaml().encode()})
    assert _resume(tmp_path) == ("step_00000009", [])  # max_steps may change on a resume


def test_a_run_in_the_old_layout_is_moved_into_the_one_layout(tmp_path):
    """distil-run 0.1 kept a local run's checkpoints in RUN/checkpoints/; every run now keeps
    them as RUN/step_N (a Ray run's layout). Training such a run again moves them, whole, with
    `latest`, and resumes from the newest; `distil checkpoints list` then finds them."""
    from distil.runs.catalog import list_checkpoints
    from distil.storage.location import Storage

    cfg = _demo("train.max_steps=200")
    run_dir = tmp_path / "demo"
    for step in (60, 120):
        fake_checkpoint(
            run_dir / "checkpoints",
            f"step_{step:08d}",
            {"config.yaml": cfg.to_yaml().encode(), ckpt.TRAINER_STATE: f'{{"step": {step}}}'.encode()},
        )
    (run_dir / "checkpoints" / ckpt.LATEST).write_text("step_00000120")
    said: list[str] = []
    seen = continuity.check(_demo("train.max_steps=200", f"storage.uri={tmp_path}", "run.name=demo"), said.append)
    assert seen.newest == "step_00000120" and seen.finished is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_00000060", "step_00000120"]
    assert ckpt.damage(run_dir / "step_00000120") is None and (run_dir / ckpt.LATEST).read_text() == "step_00000120"
    assert any("2 checkpoint(s) moved from checkpoints/" in m for m in said), said
    assert [c.step for c in list_checkpoints(Storage(str(tmp_path))) if c.complete] == [60, 120]
    assert ckpt.adopt_old_layout(run_dir) == []  # a second start: nothing left to move
    # The same step in both places: refused, nothing moved.
    fake_checkpoint(run_dir / "checkpoints", "step_00000060", {"x.pt": b"1"})
    with pytest.raises(UserError, match="both exist"):
        ckpt.adopt_old_layout(run_dir)
    assert (run_dir / "checkpoints" / "step_00000060" / "x.pt").is_file()


def test_start_over_moves_the_run_aside(tmp_path):
    cfg = _demo(f"storage.uri={tmp_path}")
    (tmp_path / "demo").mkdir(parents=True)
    (tmp_path / "demo" / "metrics.jsonl").write_text("{}\n")
    said: list[str] = []
    continuity.start_over(cfg, said.append)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("demo.replaced-")]
    assert not (tmp_path / "demo").exists() and len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file()
    assert str(moved[0]) in said[0]


# -- secrets and values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "data.hub_kwargs={token: hf_SECRETVALUE}",
        "data.hub_kwargs={lang: pl, HF_TOKEN: hf_SECRETVALUE}",
        "data.hub_kwargs={storage_options: {secret: hf_SECRETVALUE}}",
        "data.hub_kwargs={api_key: hf_SECRETVALUE}",
        "data.hub_kwargs={password: hf_SECRETVALUE}",
        "storage.endpoint_url=http://minio:hf_SECRETVALUE@minio:9000",
        "storage.endpoint_url=https://user@minio",
    ],
)
def test_credentials_in_the_config_are_refused_and_never_echoed(override):
    with pytest.raises(UserError) as e:
        _demo(override)
    assert "hf_SECRETVALUE" not in str(e.value) and "minio:9000" not in str(e.value)
    assert "data.hub_kwargs" in str(e.value) or "storage.endpoint_url" in str(e.value)


def test_hub_kwargs_without_credentials_pass():
    assert _demo("data.hub_kwargs={lang: pl, author_list: [a], split: train}").data.hub_kwargs["lang"] == "pl"


@pytest.mark.parametrize(
    "override,where",
    [
        ("optim.betas=[0.9, 1.5]", "optim"),
        ("optim.betas=[-0.1, 0.9]", "optim"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("loss.temperature=.inf", "loss.temperature"),
        ("optim.eps=.nan", "optim.eps"),
        ("loss.alpha_kl=.inf", "loss.alpha_kl"),
        ("storage.endpoint_url=notaurl", "storage"),
    ],
)
def test_values_the_run_cannot_use_are_refused(override, where):
    with pytest.raises(UserError) as e:
        _demo(override)
    assert where in str(e.value)


def test_config_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(p)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
KEYS = st.sampled_from(
    [
        "optim.lr",
        "optim.betas",
        "loss.temperature",
        "train.max_steps",
        "student.layers",
        "run.name",
        "data.hub_kwargs",
        "storage.endpoint_url",
        "masking.prob",
        "nope.key",
        "optim",
        "run.name.x",
    ]
)


def test_any_override_gives_a_config_or_one_user_error():
    """Overrides are parsed as YAML: whatever the value, the outcome is a valid config or a
    UserError, never another exception; and a valid one survives the save/load round trip. The
    search must reach both outcomes, or it proved nothing about one of them."""
    outcomes = {"accepted": 0, "refused": 0}

    # derandomize: the same 200 examples every run. Drawn afresh, about one run in twelve met fewer
    # than 10 acceptable values (seed 1: 8 of 200) and failed CI on the search, not on the code.
    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(
        key=KEYS,
        value=st.one_of(
            SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2)
        ),
    )
    def check(key, value):
        try:
            cfg = _demo(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        except UserError:
            outcomes["refused"] += 1
            return
        outcomes["accepted"] += 1
        assert DistilConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg

    check()
    assert outcomes["accepted"] >= 10 and outcomes["refused"] >= 10, outcomes


def test_a_step_saved_again_sorts_after_the_first_save(tmp_path):
    """step_N.1: a Ray run that fell back from a damaged step N saves N again beside it."""
    from distil.runs.catalog import list_checkpoints, select
    from distil.runs.stores import RayCheckpointStore
    from distil.storage.location import Storage

    root = tmp_path / "r"
    for tag in ("step_00000008", "step_00000012", "step_00000012.1", "step_00000012.2", "step_00000016"):
        fake_checkpoint(root, tag, {"a.pt": b"x"}, step=ckpt.tag_key(tag)[0])
    assert ckpt.complete_tags(root)[-3:] == ["step_00000012.1", "step_00000012.2", "step_00000016"]
    assert ckpt.damage(root / "step_00000012.1") is None
    assert (
        ckpt.tag_for(12, 2) == "step_00000012.2" and not ckpt.is_tag("step_00000012.0") and not ckpt.is_tag("step_12")
    )
    infos = list_checkpoints(Storage(str(root)))
    assert [c.tag for c in infos][-2:] == ["step_00000012.2", "step_00000016"]
    assert select(infos, "u", 12).tag == "step_00000012.2"
    store = RayCheckpointStore(_demo())
    passed_over = ["step_00000012", "step_00000012.1"]
    assert (
        store.checkpoint_name("step_00000012", passed_over) == "step_00000012.2"
        and store.checkpoint_name("step_00000016", passed_over) == "step_00000016"
    )
