"""One process trains a run at a time (distil/runs/lease.py), in a local folder and in S3 (moto_server,
which honours conditional PUTs as S3 does): a living holder is refused by name, a dead one is
taken over, another machine's lease is taken over only once it goes unrenewed for its ttl, and
of several processes racing for a free lease exactly one wins."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest

from distil.errors import UserError
from distil.runs import lease as lease_mod
from distil.runs.lease import RunLease, _parse
from distil.storage.location import Storage
from tests.conftest import ROOT


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "runs"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return Storage(f"s3://{bucket}/runs", endpoint)


def _stored(root) -> dict | None:
    return _parse(RunLease(root, "r").backend.read()[1])


def _plant(root, **record) -> None:
    """A lease record as another holder wrote it."""
    backend = RunLease(root, "r").backend
    version, _ = backend.read()
    written, _, _ = backend.swap(
        version,
        {
            "holder": uuid.uuid4().hex,
            "host": "elsewhere",
            "pid": 4242,
            "command": "distil train",
            "acquired": time.time(),
            "renewed": time.time(),
            "ttl_s": 60.0,
            **record,
        },
    )
    assert written


def test_held_then_released_leaving_nothing(root, tmp_path):
    with RunLease(root, "r", log=lambda _m: None) as held:
        record = _stored(root)
        assert record["pid"] == os.getpid() and record["holder"] == held.record["holder"] and record["host"]
    assert _stored(root) is None
    if not root.is_s3:
        assert not (tmp_path / "runs" / ".leases").exists()  # a released lease leaves no folder behind
    else:
        assert root.list_objects() == []


def test_a_living_holder_is_refused_by_name(root):
    said = []
    with RunLease(root, "r", log=said.append):
        with pytest.raises(UserError) as e:
            RunLease(root, "r", log=said.append).acquire()
    assert f"run r is in use: host {os.uname().nodename}, pid {os.getpid()}, since " in str(e.value)
    assert "another run.name" in e.value.fix


def test_a_dead_holder_of_this_machine_is_taken_over_at_once(root):
    """A holder killed with SIGKILL never deletes its lease; its pid is gone, so the next start
    takes it without waiting for the ttl."""
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from distil.runs.lease import RunLease; from distil.storage.location import Storage;"
        f"RunLease(Storage({root.uri!r}, {root.endpoint_url!r}), 'r', ttl_s=3600).acquire(); os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    dead = _stored(root)
    assert dead and dead["ttl_s"] == 3600
    said = []
    started = time.monotonic()
    with RunLease(root, "r", log=said.append):
        assert _stored(root)["pid"] == os.getpid()
    assert time.monotonic() - started < 10 and f"pid {dead['pid']}" in said[0] and "which is gone" in said[0]


def test_another_machines_lease_is_taken_over_once_it_goes_unrenewed(root):
    _plant(root, ttl_s=2.0)
    said = []
    started = time.monotonic()
    with RunLease(root, "r", log=said.append):
        waited = time.monotonic() - started
    assert 2.0 <= waited < 15, waited
    assert "leased to host elsewhere, pid 4242" in said[0] and "waiting up to 2 s" in said[0]
    assert "took over the lease of host elsewhere" in said[1]


def test_another_machines_lease_that_is_renewed_is_refused(root):
    """Clocks of two machines may disagree: a lease is alive when it is seen renewed."""
    _plant(root, ttl_s=4.0)
    backend = RunLease(root, "r").backend
    stop = threading.Event()

    def renew():  # the other machine's holder, renewing every second
        while not stop.wait(1.0):
            version, body = backend.read()
            backend.swap(version, {**json.loads(body), "renewed": time.time()})

    t = threading.Thread(target=renew)
    t.start()
    try:
        with pytest.raises(UserError, match="run r is in use: host elsewhere, pid 4242"):
            RunLease(root, "r", log=lambda _m: None).acquire()
    finally:
        stop.set()
        t.join()


def test_the_holder_renews(root):
    with RunLease(root, "r", ttl_s=0.8, log=lambda _m: None):
        first = _stored(root)["renewed"]
        time.sleep(0.7)
        assert _stored(root)["renewed"] > first


def _race(uri: str, endpoint: str | None, out) -> None:
    try:
        RunLease(Storage(uri, endpoint), "r", log=lambda _m: None).acquire()
        out.put("won")
        time.sleep(3)  # hold it while the others try
    except UserError:
        out.put("refused")


def test_of_processes_racing_for_a_free_lease_one_wins(root):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(root.uri, root.endpoint_url, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == ["refused", "refused", "refused", "won"]


def test_a_holder_that_lost_its_lease_stops_without_writing(tmp_path):
    """Suspended past its ttl, another start took the run over: the old holder's next renewal
    finds that, and the process ends at once (exit 75) rather than write beside the new holder."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from distil.runs.lease import RunLease; from distil.storage.location import Storage;"
        f"RunLease(Storage({str(tmp_path / 'runs')!r}), 'r', ttl_s=2).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    backend = RunLease(Storage(str(tmp_path / "runs")), "r").backend
    version, body = backend.read()
    assert backend.swap(version, {**json.loads(body), "holder": "thief", "host": "elsewhere", "machine": "elsewhere"})[
        0
    ]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == lease_mod.EXIT_LEASE_LOST and "was taken over by host elsewhere" in err


def test_a_write_that_landed_unacknowledged_is_still_this_holders(tmp_path):
    """A renewal whose conditional PUT reached the store but whose answer was lost (boto3 retries
    it, and the retry fails its precondition) finds the lease holding its own record: it goes on
    holding it, rather than stop as if another process had taken the run."""
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from distil.runs.lease import RunLease, _parse
from distil.storage.location import Storage
lease = RunLease(Storage({str(tmp_path / "runs")!r}), "r", ttl_s=0.4, log=lambda m: None).acquire()
real, lost = lease.backend.swap, []
def answer_lost(expect, record):
    written, version, body = real(expect, record)
    if record is not None and not lost:
        lost.append(1)
        return (False, *lease.backend.read())
    return written, version, body
lease.backend.swap = answer_lost
time.sleep(1.0)
assert lost and not lease.lost and _parse(lease.backend.read()[1])["holder"] == lease.record["holder"]
lease.release()
print("held", lease.backend.read())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "held (None, None)", r.stdout + r.stderr
