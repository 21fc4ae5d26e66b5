"""Parallel, resumable downloads of S3 objects.

Each object is fetched as fixed-size ranged GETs on a thread pool (what boto3's transfer
manager does too), written in place into DEST.part. Which chunks are done is recorded in
DEST.part.json after each one, so an interrupted download (Ctrl-C, a lost connection, a
killed pod) continues where it stopped when run again, as long as the object's ETag is
unchanged; `IfMatch` makes every chunk come from the same version of the object. boto3's
own `download_file` cannot resume, which is why this is not just a call to it.

Retries: the client retries requests with exponential backoff ("standard" mode); a body cut
off mid-stream (which botocore does not retry) is retried here per chunk, with backoff.
"""

from __future__ import annotations

# Imports inside functions: botocore and tqdm only where something is downloaded.
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 * 1024 * 1024
ATTEMPTS = 6
PROGRESS_FROM = 64 * 1024 * 1024  # a progress bar for downloads at least this large


@dataclass
class Item:
    key: str
    dest: Path
    size: int
    etag: str | None


class _Partial:
    """DEST.part and its chunk record DEST.part.json."""

    def __init__(self, item: Item, chunk: int):
        self.item, self.chunk = item, chunk
        self.part = item.dest.with_name(item.dest.name + ".part")
        self.record = item.dest.with_name(item.dest.name + ".part.json")
        self.n_chunks = max(1, -(-item.size // chunk))
        self.lock = threading.Lock()
        self.done: set[int] = set()
        want = {"etag": item.etag, "size": item.size, "chunk": chunk}
        if self.record.is_file() and self.part.is_file():
            saved = json.loads(self.record.read_text())
            if {k: saved.get(k) for k in want} == want:
                self.done = set(saved["done"])
        if not self.done:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            with open(self.part, "wb") as f:
                f.truncate(item.size)
        self.want = want

    def todo(self) -> list[int]:
        return [i for i in range(self.n_chunks) if i not in self.done]

    def range_of(self, i: int) -> tuple[int, int]:
        return i * self.chunk, min(self.item.size, (i + 1) * self.chunk) - 1

    def write(self, i: int, data: bytes) -> bool:
        """Store chunk i; True when the object is whole (DEST.part then becomes DEST)."""
        fd = os.open(self.part, os.O_WRONLY)
        try:
            os.pwrite(fd, data, self.range_of(i)[0])
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.lock:
            self.done.add(i)
            if len(self.done) == self.n_chunks:
                os.replace(self.part, self.item.dest)
                self.record.unlink(missing_ok=True)
                return True
            tmp = self.record.with_suffix(".tmp")
            tmp.write_text(json.dumps({**self.want, "done": sorted(self.done)}))
            os.replace(tmp, self.record)
        return False


def _get_range(client, bucket: str, item: Item, first: int, last: int) -> bytes:
    from botocore.exceptions import ClientError

    extra = {"IfMatch": item.etag} if item.etag else {}
    for attempt in range(ATTEMPTS):
        try:
            body = client.get_object(Bucket=bucket, Key=item.key, Range=f"bytes={first}-{last}", **extra)["Body"].read()
            if len(body) == last - first + 1:
                return body
            error: Exception = OSError(f"{item.key}: got {len(body)} bytes of {last - first + 1}")
        except ClientError:
            raise  # missing object, changed object (PreconditionFailed), access: retrying won't help
        except Exception as e:  # connection dropped mid-body and the like
            error = e
        if attempt < ATTEMPTS - 1:
            time.sleep(min(8.0, 0.25 * 2**attempt))
    raise error


def _fetch(client, bucket: str, p: _Partial, i: int) -> int:
    """Chunk i of p's object, fetched and stored; its length."""
    first, last = p.range_of(i)
    data = _get_range(client, bucket, p.item, first, last) if p.item.size else b""
    p.write(i, data)
    return len(data)


def download(
    client, bucket: str, items: list[Item], workers: int = 8, chunk: int = CHUNK, progress: bool | None = None
) -> None:
    """Fetch every item to item.dest; objects already there with the right size are skipped.

    progress: None shows a bar for large downloads on a terminal."""
    from tqdm.auto import tqdm

    pending = [it for it in items if not (it.dest.is_file() and it.dest.stat().st_size == it.size)]
    partials = [_Partial(it, chunk) for it in pending]
    total = sum(it.size for it in pending)
    done_bytes = sum(p.range_of(i)[1] - p.range_of(i)[0] + 1 for p in partials for i in p.done)
    disable = (None if total >= PROGRESS_FROM else True) if progress is None else not progress
    with (
        tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc="download", disable=disable) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        # Each task fetches its chunk and writes it: a chunk is in memory only while its task
        # runs (at most `workers` x `chunk` bytes), never kept by a finished future until the end.
        futures = [pool.submit(_fetch, client, bucket, p, i) for p in partials for i in p.todo()]
        try:
            for fut in as_completed(futures):
                bar.update(fut.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
