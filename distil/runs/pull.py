"""`distil checkpoints pull`: a checkpoint in storage -> a Hugging Face model folder (or the raw
DeepSpeed checkpoint with --raw).

Objects are downloaded into a cache outside DIR (~/.cache/distil/pull by default), checked
against the checkpoint's manifest (size and sha256 of every file), then the ZeRO shards are
merged to fp32 and DIR is created in one rename. A failed or interrupted pull leaves no DIR;
running it again reuses what the cache already holds and resumes partial objects.
"""

from __future__ import annotations

# Imports inside functions: the export (torch, DeepSpeed) only when a pull merges the shards.
import os
import shutil
import tempfile
from pathlib import Path

from distil.errors import UserError
from distil.quiet import quiet_libraries
from distil.runs import layout as ckpt
from distil.runs.catalog import CheckpointInfo, list_checkpoints, select
from distil.storage import integrity
from distil.storage.download import Item, download
from distil.storage.location import Storage, s3_errors
from distil.storage.paths import regular_file, remove_tree, safe_join


def default_cache() -> Path:
    return Path(os.environ.get("DISTIL_CACHE", "~/.cache/distil")).expanduser() / "pull"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty", where="--out", fix="choose a new folder")
    if not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
        raise UserError(f"cannot write into {out.parent}", where="--out", fix="choose a folder you can write to")


def _check_cache(cache: Path, workers: int) -> None:
    if workers < 1:
        raise UserError(
            f"--workers {workers}: at least one download is needed", where="--workers", fix="give --workers 1 or more"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache folder {cache}: {e.strerror}",
            where="--cache-dir",
            fix="choose a folder you can write to",
        ) from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write into the cache folder {cache}", where="--cache-dir", fix="choose a folder you can write to"
        )


def _fetch(storage: Storage, info: CheckpointInfo, cache: Path, workers: int, progress: bool | None) -> Path:
    """The checkpoint folder on this machine, every file checked against the manifest."""
    files = info.meta["files"]
    if not storage.is_s3:
        local = Path(storage.uri).expanduser() / info.prefix
        _verify(local, files, storage.uri)
        return local
    where = safe_join(cache, f"{storage.bucket}/{storage.key(info.prefix)}")

    def item(rel: str) -> Item:
        obj = info.objects[rel]  # its key as listed, not as re-joined
        return Item(storage.key(obj["key"]), safe_join(where, rel), obj["size"], obj["etag"])

    items = [item(rel) for rel in [*files, ckpt.COMPLETE]]
    with s3_errors(storage.uri, storage.endpoint_url):
        client = storage.client(max_pool_connections=workers)
        download(client, storage.bucket, items, workers=workers, progress=progress)
        bad = integrity.verify(where, files)
        if bad:  # a cached copy may be stale or damaged: fetch those files once more
            for rel in bad:
                (where / rel).unlink(missing_ok=True)
            download(client, storage.bucket, items, workers=workers, progress=progress)
    _verify(where, files, storage.uri)
    ckpt.drop_unlisted(where, files)  # our cache: an older pull of this step may have left other shards
    return where


def _copy_checked(folder: Path, files: list[str], dest: Path) -> None:
    """The checkpoint's own files (its manifest and COMPLETE), each a regular file: nothing
    else in the folder, and nothing a symbolic link points to, is copied."""
    for rel in files:
        target = safe_join(dest, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(regular_file(folder, rel), target, follow_symlinks=False)


def _verify(folder: Path, files: dict, uri: str) -> None:
    bad = integrity.verify(folder, files)
    if bad:
        raise UserError(
            f"the checkpoint in {uri} is damaged: {integrity.describe(bad)}",
            fix="pull another step (`distil checkpoints list`)",
        )


def pull(
    uri: str,
    out: Path,
    step: str | int | None = None,
    raw: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
    cache: Path | None = None,
    workers: int = 8,
    progress: bool | None = None,
    keep_cache: bool = False,
) -> dict:
    out = Path(out).expanduser()
    _check_out(out)
    storage = Storage(uri, endpoint_url, region)
    cache = Path(cache or default_cache()).expanduser()
    if storage.is_s3:  # the flags first: nothing is asked of the store before they are right
        _check_cache(cache, workers)
    info = select(list_checkpoints(storage), uri, step)
    folder = _fetch(storage, info, cache, workers, progress)
    try:
        if raw:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            try:
                _copy_checked(folder, [*info.meta["files"], ckpt.COMPLETE], tmp / info.tag)
                if out.exists():
                    out.rmdir()
                (tmp / info.tag).rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            # transformers and DeepSpeed only now: a refused pull answers in seconds, not after
            # ~10 s of imports.

            quiet_libraries()
            from distil.runs.export import export_checkpoint

            export_checkpoint(folder, out, hashed=True)
    finally:
        if storage.is_s3 and not keep_cache and out.exists():
            remove_tree(folder, cache)
    return {"out": str(out), "run": info.run or ".", "step": info.step, "raw": raw}
