"""One process trains a run at a time: a lease in the run's storage.

Two `distil train` of one run would interleave their steps in one metrics.jsonl and write
checkpoints over each other; a `--start-over` during a run would move its folder away under
it. So the process that trains a run -- a local `distil train` (rank 0 of a torchrun), or the
Ray driver (`jobs/distill.py`) for all of its workers -- holds a lease first:

    STORAGE/.leases/RUN.json    {holder, host, pid, command, acquired, renewed, ttl_s}

(beside the runs: `--start-over` moves the run's folder, never its lease; run names cannot
start with "."). The holder renews it every ttl_s / 4 on a thread and deletes it at exit. A
second start finds it and, when the holder is alive, is refused with who holds it (host, pid,
since when, its command). A holder that died without deleting it (SIGKILL, a lost node) is
taken over: at once when it was a process of this machine that is gone, otherwise once its
lease has gone unrenewed for ttl_s *as this process observes it* -- a renewal seen in that
time means the holder lives (refused). Watching for a renewal rather than comparing
timestamps keeps two machines with skewed clocks from both believing they hold it.

Every change is a compare-and-swap: on S3 a conditional PUT (`If-None-Match: *` to create,
`If-Match: <ETag>` to renew or take over; AWS S3, MinIO and Cloudflare R2 honour them; a store
that ignores them makes the lease advisory); on a local or shared folder, the same under an
flock of the lease file. A holder whose renewal finds the lease taken over (it was stopped
for longer than ttl_s, e.g. a suspended VM) stops at once without writing anything more.
"""

from __future__ import annotations

# Imports inside functions: botocore only for a lease in S3.
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from distil.errors import UserError
from distil.processes import gone
from distil.storage.location import s3_errors

TTL_S = 60.0
FOLDER = ".leases"
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: another process holds the run now


def _machine() -> str:
    """This machine and process namespace: pids are comparable only within one."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino))
    return "/".join(parts)


def _started(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc), telling a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict) -> bool | None:
    """Whether the holder is a living process of this machine; None when it is another machine's."""
    if record.get("machine") != _machine():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    if gone(pid):
        return False
    return record.get("pid_started") in (None, _started(pid))


def describe(record: dict) -> str:
    when = record.get("acquired")
    since = (
        datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(when, (int, float))
        else "?"
    )
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since {since} ({record.get('command', '?')})"


def _parse(body: str | None) -> dict | None:
    """The record in a lease's body: None when there is no lease, {} when it is not a record."""
    if not body:
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _LocalBackend:
    """The lease as a file, its text its version; each change under an exclusive flock of the file."""

    def __init__(self, root: Path, run: str):
        self.folder = root / FOLDER
        self.path = self.folder / f"{run}.json"

    @contextlib.contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")
            fcntl.flock(f, fcntl.LOCK_EX)
            try:  # the file we locked may have been deleted meanwhile: lock the one at the path
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        try:
            yield f
        finally:
            f.close()

    def read(self) -> tuple[str | None, str | None]:
        """(version, body); (None, None) when there is no lease."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        return (text, text) if text else (None, None)

    def swap(self, expect: str | None, record: dict | None) -> tuple[bool, str | None, str | None]:
        """Write `record` (None: delete the lease) if its version is still `expect` (None: no
        lease); returns (written, version, body) as they are now."""
        with self._locked() as f:
            f.seek(0)
            current = f.read() or None
            if current != expect:
                return False, current, current
            if record is None:
                os.unlink(self.path)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # nothing left behind by a run that has ended
                return True, None, None
            body = json.dumps(record)
            f.seek(0)
            f.truncate()
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
            return True, body, body


class _S3Backend:
    """The lease as an object, its ETag its version; changes are conditional PUTs and DELETEs."""

    def __init__(self, storage, run: str):
        self.storage, self.key = storage, storage.key(f"{FOLDER}/{run}.json")

    def read(self) -> tuple[str | None, str | None]:
        from botocore.exceptions import ClientError

        with s3_errors(self.storage.uri, self.storage.endpoint_url):
            try:
                obj = self.storage.client().get_object(Bucket=self.storage.bucket, Key=self.key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None, None
                raise
            return obj["ETag"], obj["Body"].read().decode("utf-8", "replace")

    def swap(self, expect: str | None, record: dict | None) -> tuple[bool, str | None, str | None]:
        from botocore.exceptions import ClientError

        client = self.storage.client()
        with s3_errors(self.storage.uri, self.storage.endpoint_url):
            try:
                if record is None:
                    client.delete_object(Bucket=self.storage.bucket, Key=self.key, IfMatch=expect)
                    return True, None, None
                body = json.dumps(record)
                condition = {"IfMatch": expect} if expect else {"IfNoneMatch": "*"}
                put = client.put_object(Bucket=self.storage.bucket, Key=self.key, Body=body.encode(), **condition)
                return True, put["ETag"], body
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in (
                    "PreconditionFailed",
                    "ConditionalRequestConflict",
                    "412",
                    "409",
                ):
                    raise
        return (False, *self.read())


class RunLease:
    """The lease of one run (see the module's docstring): `acquire()`, then `release()` (or use
    it as a context manager)."""

    def __init__(self, storage_root, run: str, ttl_s: float = TTL_S, log=print):
        self.run, self.ttl_s, self.log = run, float(ttl_s), log
        self.where = f"{storage_root.uri}/{FOLDER}/{run}.json"
        self.backend = _S3Backend(storage_root, run) if storage_root.is_s3 else _LocalBackend(storage_root.local(), run)
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {
            "holder": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid": os.getpid(),
            "pid_started": _started(os.getpid()),
            "command": " ".join(sys.argv)[:300],
            "ttl_s": self.ttl_s,
        }

    def _mine(self) -> dict:
        now = time.time()
        self.record.setdefault("acquired", now)
        return {**self.record, "renewed": now}

    def acquire(self) -> "RunLease":
        """Take the lease, taking over a dead holder's; refuse (UserError) a living holder's."""
        watched, seen_at = None, 0.0  # (holder, version) of another machine's lease, and since when
        while True:
            version, body = self.backend.read()
            held = _parse(body)
            if held and held.get("holder") == self.record["holder"]:  # our own write, whose answer was lost (a retry)
                return self._hold(version)
            if held:
                alive = _alive(held)
                if alive is True:
                    self._refuse(held)
                ttl = float(held.get("ttl_s") or TTL_S)
                if alive is None:  # another machine's: alive while it renews
                    if watched is None or watched[0] != held.get("holder"):
                        self.log(
                            f"run {self.run} is leased to {describe(held)}; waiting up to {ttl:g} s for a "
                            "renewal (none: the holder is gone, and the lease is taken over)"
                        )
                        watched, seen_at = (held.get("holder"), version), time.monotonic()
                    elif watched[1] != version:
                        self._refuse(held)  # renewed while we watched
                    if time.monotonic() - seen_at < ttl:
                        time.sleep(min(1.0, ttl / 8))
                        continue
            written, version_now, _ = self.backend.swap(version, self._mine())
            if written:
                if held:
                    self.log(f"run {self.run}: took over the lease of {describe(held)}, which is gone")
                return self._hold(version_now)

    def _refuse(self, held: dict):
        raise UserError(
            f"run {self.run} is in use: {describe(held)} holds its lease ({self.where})",
            where="run.name",
            fix="wait for that run to end (or stop it), or give this one another run.name; a lease whose "
            "holder is gone is taken over by the next start",
        )

    def _hold(self, version: str | None) -> "RunLease":
        self.version = version
        self._thread = threading.Thread(target=self._renew, name="distil-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                written, version, body = self.backend.swap(self.version, self._mine())
            except Exception as e:  # an outage: try again at the next tick (it expires only after ttl_s)
                self.log(f"warning: could not renew the lease of run {self.run}: {type(e).__name__}")
                continue
            if written or (_parse(body) or {}).get("holder") == self.record["holder"]:  # (ours: a retried write landed)
                self.version = version
                continue
            self.lost = True
            print(
                f"distil: error: the lease of run {self.run} was taken over by {describe(_parse(body) or {})} while "
                f"this process did not renew it for {self.ttl_s:g} s; stopping without writing more",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_LEASE_LOST)

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this process's."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=60)
        self._thread = None
        if not self.lost:
            with contextlib.suppress(Exception):  # at exit: a store that is down keeps it until it expires
                self.backend.swap(self.version, None)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()
