"""The run's heartbeat (distil/runs/heartbeat.py): what a resumed start says about the time the
run trained nothing, written to a real folder and a real S3 endpoint (moto_server)."""

from __future__ import annotations

import json
import threading

from distil.runs.heartbeat import EVERY_S, HEARTBEAT, Gap, Heartbeat, gap
from distil.storage.location import Storage

T = 1_000_000_000.0  # the checkpoint's saved_at, epoch s


def test_a_node_lost_without_notice_counts_from_the_last_beat_not_the_checkpoint():
    """Checkpoint at step 8; the group went on to step 11 (beat 5 s after the save), then its node
    vanished; the next group starts 80 s after the save. Measured from the checkpoint it would
    read 80 s and no step trained again: 75 s and steps 9-11."""
    g = gap({"step": 11, "at": T + 5}, resumed_step=8, saved_at=T, now=T + 80)
    assert g == Gap(last_step=11, seconds=75.0, retrained=3)
    assert g.text() == "the run's last sign of life: step 11, 75 s ago (steps 9-11 are trained again)"


def test_an_announced_preemption_counts_from_its_checkpoint():
    """A drain checkpoints the step in flight after that step's beat: the save is the later sign."""
    g = gap({"step": 8, "at": T - 1.5}, resumed_step=8, saved_at=T, now=T + 40)
    assert g == Gap(last_step=8, seconds=40.0, retrained=0)
    assert g.text() == "the run's last sign of life: step 8, 40 s ago (the checkpoint's)"


def test_a_beat_older_than_the_checkpoint_or_none_leaves_the_checkpoint():
    assert gap({"step": 5, "at": T - 3}, resumed_step=8, saved_at=T, now=T + 10) == Gap(8, 10.0, 0)
    assert gap(None, resumed_step=8, saved_at=T, now=T + 10) == Gap(8, 10.0, 0)
    assert gap({"step": 9, "at": T + 1}, resumed_step=8, saved_at=None, now=T + 10) == Gap(9, 9.0, 1)
    assert gap(None, resumed_step=8, saved_at=None, now=T) is None
    assert gap(None, resumed_step=8, saved_at=T, now=T - 5).seconds == 0.0  # (clocks of two nodes)


class Clock:
    def __init__(self):
        self.now = T

    def __call__(self) -> float:
        return self.now


def _beats(storage: Storage, tmp_path) -> None:
    clock = Clock()
    rank0 = Heartbeat(storage, enabled=True, clock=clock)
    assert rank0.last() is None  # a run's first start: no heartbeat
    rank0.beat(1, workers=2)  # the first step of a start: written
    rank0.wait(30)
    assert Heartbeat(storage, enabled=True).last() == {"step": 1, "at": T, "workers": 2}
    clock.now += EVERY_S / 2
    rank0.beat(2, workers=2)  # too soon: nothing written
    rank0.wait(30)
    assert Heartbeat(storage, enabled=True).last()["step"] == 1
    clock.now += EVERY_S
    rank0.beat(3, workers=2)
    rank0.wait(30)
    record = json.loads(storage.read_bytes(HEARTBEAT))
    assert record == {"step": 3, "at": T + 1.5 * EVERY_S, "time": "2001-09-09T01:46:43Z", "workers": 2}
    other = Heartbeat(storage, enabled=False, clock=clock)  # ranks other than 0 neither write nor read
    clock.now += 10 * EVERY_S
    other.beat(4, workers=2)
    assert other.last() is None and Heartbeat(storage, enabled=True).last()["step"] == 3


def test_beats_in_a_local_run_folder(tmp_path):
    run = tmp_path / "runs" / "t"
    _beats(Storage(str(run)), tmp_path)
    assert sorted(p.name for p in run.iterdir()) == [HEARTBEAT]  # no temporary file left


def test_beats_in_s3(tmp_path, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="beats")
    _beats(Storage("s3://beats/runs/t", s3_endpoint), tmp_path)


class SlowStorage:
    """A store whose writes hang until released (an endpoint that stopped answering)."""

    def __init__(self):
        self.release, self.written = threading.Event(), []

    def write_bytes(self, relative, data):
        self.release.wait(30)
        self.written.append(json.loads(data)["step"])

    def read_bytes(self, relative):
        raise OSError("unreachable")


def test_storage_that_hangs_or_is_gone_never_holds_a_step():
    clock, slow = Clock(), SlowStorage()
    hb = Heartbeat(slow, enabled=True, clock=clock)
    hb.beat(1, workers=1)  # returns with its write hanging
    clock.now += 10 * EVERY_S
    hb.beat(2, workers=1)  # the last write still going: skipped, not queued behind it
    slow.release.set()
    hb.wait(30)
    assert slow.written == [1] and hb.last() is None  # an unreadable heartbeat is none
    clock.now += 10 * EVERY_S
    hb.beat(3, workers=1)
    hb.wait(30)
    assert slow.written == [1, 3]
    gone = Heartbeat(Storage("s3://beats/runs/t", "http://127.0.0.1:9", max_attempts=1), enabled=True, clock=clock)
    gone.beat(1, workers=1)  # (connection refused, in its thread: no exception here)
    gone.wait(60)
    assert gone.last() is None


def test_a_resize_line_says_how_long_the_run_trained_nothing():
    from distil.train import trainer

    lost = gap({"step": 43, "at": T + 5}, resumed_step=40, saved_at=T, now=T + 35)
    assert trainer._resize_line({"step": 40, "from": 2, "to": 1}, lost) == (
        "resize: 2 -> 1 workers at step 40 (fewer could be placed: a node was lost or is being reclaimed); "
        "down about 30 s (the run's last sign of life: step 43)"
    )
    assert "(capacity came back)" in trainer._resize_line({"step": 80, "from": 1, "to": 2}, None)
    manual = trainer._resize_line({"step": 80, "from": 2, "to": 1}, None, elastic=False)
    assert manual == "resize: 2 -> 1 workers at step 80 (started again with another scaling.num_workers)"
