"""Checkpoint discovery, manifests, and the metrics history after a resume."""

from __future__ import annotations

import pytest

from distil.errors import UserError
from distil.eval.plot import series
from distil.runs import layout as ckpt
from distil.runs.catalog import _split, list_checkpoints, select
from distil.runs.metrics_log import MetricsLog, read_rows
from distil.storage import integrity
from distil.storage.location import Storage
from tests.conftest import fake_checkpoint


def test_split_reads_the_one_layout():
    assert _split("t/step_00000003/hf/config.json", None) == ("t", "t/step_00000003", "hf/config.json")
    assert _split("a/b/step_00000003/COMPLETE", None) == ("a/b", "a/b/step_00000003", "COMPLETE")
    assert _split("t/step_00000012/COMPLETE", None) == ("t", "t/step_00000012", "COMPLETE")
    assert _split("step_00000012/COMPLETE", None) == ("", "step_00000012", "COMPLETE")
    assert _split("t/metrics.jsonl", None) is None
    assert _split("COMPLETE", "step_00000004") == ("", "", "COMPLETE")


def test_completeness_and_selection(tmp_path):
    run = tmp_path / "runs" / "r"
    fake_checkpoint(run, "step_00000002", {"a.pt": b"12345", "hf/config.json": b"{}"})
    d4 = fake_checkpoint(run, "step_00000004", {"a.pt": b"12345"})
    fake_checkpoint(run, "step_00000006", {"a.pt": b"12345"}, complete=False)
    infos = list_checkpoints(Storage(str(tmp_path / "runs")))
    assert [(c.run, c.step, c.complete) for c in infos] == [("r", 2, True), ("r", 4, True), ("r", 6, False)]
    assert "no COMPLETE" in infos[2].problem
    assert select(infos, "u", "latest").step == 4 and select(infos, "u", 2).step == 2
    with pytest.raises(UserError, match="incomplete"):
        select(infos, "u", 6)
    (d4 / "a.pt").write_bytes(b"123")  # truncated
    assert "truncated" in list_checkpoints(Storage(str(tmp_path / "runs")))[1].problem
    (d4 / "a.pt").write_bytes(b"12346")  # same size, other bytes: only the hash sees it
    assert integrity.verify(d4, ckpt.read_complete(d4)["files"]) == {"a.pt": "sha256 differs from the manifest"}
    assert integrity.verify(d4, ckpt.read_complete(d4)["files"], hashes=False) == {}


def test_leftovers_of_an_unfinished_save_of_the_same_step(tmp_path):
    """A preempted 2-worker run uploaded part of step 6; the 1-worker rerun saved step 6 over it."""
    d = fake_checkpoint(tmp_path, "step_00000006", {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"new", "hf/a": b"x"})
    for stale in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001.pt"):
        (d / stale).write_bytes(b"old shard")
    info = list_checkpoints(Storage(str(tmp_path / "step_00000006")))[0]
    assert info.complete and info.size == len(b"new") + 1 + (d / ckpt.COMPLETE).stat().st_size  # the manifest's files
    assert ckpt.drop_unlisted(d, ckpt.read_complete(d)["files"]) == [
        "rank_00001.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(f.name for f in d.iterdir()) == ["COMPLETE", "hf", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    ckpt.clear_for_save(d)  # a save of step 6 again (after a fall-back from a damaged step 6) starts clean
    assert not d.exists()


def test_manifest_owner_of_rank_files(tmp_path):
    for name in (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rank_00001.pt",
        "mp_rank_00_model_states.pt",
        "rank_00000.pt",
    ):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(ckpt.rank_manifest(tmp_path, 1)) == ["rank_00001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(ckpt.rank_manifest(tmp_path, 0)) == ["mp_rank_00_model_states.pt", "rank_00000.pt"]


def test_resume_drops_history_that_is_trained_again(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    for step in (2, 4, 6):
        log.write({"step": step, "train/loss": float(step)})
    log.resumed_at(4, None)
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [2, 4]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut short by a kill
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [2, 4]


def test_series_later_rows_win():
    rows = [{"step": 1, "lr": 1.0}, {"step": 2, "lr": 2.0, "note": "x"}, {"step": 2, "lr": 3.0}]
    assert series(rows) == {"lr": ([1, 2], [1.0, 3.0])}
