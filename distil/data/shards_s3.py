"""Prepared data in object storage (distil/data/shards.py has the format): uploaded once, the
manifest last, and read by every rank through a local cache that fetches a shard when a sample
in it is first read, each file checked as it arrives."""

from __future__ import annotations

# Imports inside functions: boto3's transfer manager only where a preparation is uploaded.
import fcntl
import json
import os
import threading
from pathlib import Path

from distil.data import shard_check
from distil.data.shard_check import DamagedData, files_of, manifest_problem
from distil.data.shards import COUNTS, MANIFEST, PreparedData
from distil.errors import UserError
from distil.storage.download import Item, download
from distil.storage.integrity import sha256_file
from distil.storage.location import s3_errors
from distil.storage.paths import safe_join


def upload(folder: Path, storage) -> None:
    """Upload a prepared folder to `storage` (a Storage at .../data/<fingerprint>): every file of
    the manifest, then MANIFEST.json last, so a store is complete once its manifest is there."""
    from boto3.s3.transfer import TransferConfig

    store = PreparedData(folder)  # (its writer recorded its check: the files it made are not hashed again)
    with s3_errors(storage.uri, storage.endpoint_url):
        client = storage.client()
        for rel in [*sorted(store.files()), MANIFEST]:  # the manifest last
            client.upload_file(
                str(Path(folder) / rel),
                storage.bucket,
                storage.key(rel),
                Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20),
            )


def open_remote(storage, cache: Path, expect: dict | None = None) -> PreparedData:
    """A prepared store in S3 through a local cache (cache/<bucket>/<prefix>): the manifest,
    counts and offsets now, each token shard when a sample in it is first read. Every file is
    checked against the manifest's size and sha256 when it arrives; a damaged copy is fetched
    once more, then refused."""

    local = safe_join(Path(cache), f"{storage.bucket}/{storage.prefix}")
    listing = {o["key"]: o for o in storage.list_objects()}
    if MANIFEST not in listing:
        raise UserError(
            f"{storage.uri} holds no prepared data (no {MANIFEST}: never prepared, or cut short)",
            fix="prepare it (`distil prepare`)",
        )
    local.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    problem = "not valid JSON" if manifest is None else manifest_problem(manifest)
    if problem:
        raise DamagedData(storage.uri, {MANIFEST: problem}, fix="prepare the data again (delete the prefix first)")
    wanted = files_of(manifest)
    with s3_errors(storage.uri, storage.endpoint_url):
        client = storage.client(max_pool_connections=4)  # one for every fetch: boto3 clients are thread-safe

    def fetch(rel: str) -> Path:
        want, dest = wanted[rel], safe_join(local, rel)

        def whole() -> bool:
            return dest.is_file() and dest.stat().st_size == want["size"] and sha256_file(dest) == want["sha256"]

        # The ranks of a node share the cache: one of them fetches a file, the others wait for it
        # (an exclusive lock on FILE.lock, which threads of one process also respect).
        with open(dest.with_name(f"{dest.name}.lock"), "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            return _fetch_locked(rel, want, dest, whole)

    def _fetch_locked(rel: str, want: dict, dest: Path, whole) -> Path:
        fetched = 0
        while not whole():  # a cached copy, or a fresh one, or one more fresh one
            dest.unlink(missing_ok=True)
            obj = listing.get(rel)
            if obj is None:
                raise UserError(f"{storage.uri}/{rel} is missing", fix="prepare the data again")
            if fetched == 2:
                raise UserError(
                    f"{storage.uri}/{rel} does not match its manifest (size or sha256), fetched twice",
                    fix="prepare the data again (delete the prefix first)",
                )
            with s3_errors(storage.uri, storage.endpoint_url):
                download(
                    client,
                    storage.bucket,
                    [Item(storage.key(rel), dest, obj["size"], obj["etag"])],
                    workers=4,
                    progress=False,
                )
            fetched += 1
        problem = shard_check.file_problem(dest, rel, manifest)  # bytes as listed, but do they make sense?
        if problem:
            dest.unlink(missing_ok=True)
            raise DamagedData(storage.uri, {rel: problem}, fix="prepare the data again (delete the prefix first)")
        return dest

    fetch(COUNTS)
    tmp = local / f".{MANIFEST}.tmp.{os.getpid()}.{threading.get_ident()}"  # ranks of a node share the cache
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, local / MANIFEST)
    return PreparedData(local, expect=expect, fetch=fetch)
