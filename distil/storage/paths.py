"""The one rule for paths that come from storage.

Object keys, manifest entries, the `latest` pointer and run names are data: whoever can write
to the bucket (or to a checkpoint folder) chooses them. Every local path built from one goes
through `safe_join`, every local file read from a checkpoint through `regular_file`, and
every deletion through `remove_tree` below its own root, so nothing is ever written, read
through a symbolic link, or deleted outside the folder it belongs to. A key that breaks the
rule is refused (UserError, exit 2) with the key named; it is never "cleaned up" into
another path.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from distil.errors import UserError

S3 = "s3://"


def is_s3(uri: str) -> bool:
    """Whether a location (storage.uri, a data source, a command's URI) is in S3-compatible
    object storage; anything else is a local path (or, for data, a hub name). The one test."""
    return uri.startswith(S3)


def check_relative(key: str, what: str = "object key") -> PurePosixPath:
    """`key` as a relative POSIX path that stays below its root: no absolute path, no `..`,
    no empty or `.` part (`a//b`, `a/./b`: two spellings of one file), no backslash (a path
    separator on Windows), no NUL."""
    parts = key.split("/")
    bad = not key or key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts)
    if bad:
        raise UserError(
            f"{what} {key!r} would reach outside its folder, or name a file two ways (it is absolute, "
            "or holds '..', '.', an empty part or a backslash)",
            fix="remove or rename that object in storage; nothing was written",
        )
    return PurePosixPath(key)


def safe_join(root: Path, key: str, what: str = "object key") -> Path:
    """root/key for a key from storage, refused (UserError) when it would leave root."""
    return Path(root).joinpath(*check_relative(key, what).parts)


def symlink_in(root: Path, relative: str) -> Path | None:
    """The first symbolic link on the way from root to root/relative (root itself may be one)."""
    path = Path(root)
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def regular_file(root: Path, relative: str, what: str = "checkpoint file") -> Path:
    """root/relative when it is a regular file reached without a symbolic link."""
    path = safe_join(root, relative, what)
    link = symlink_in(root, relative)
    if link is not None:
        raise UserError(
            f"{what} {relative!r} in {root} goes through the symbolic link {link}",
            fix="replace the link with the file itself; links are never followed out of a checkpoint",
        )
    return path


def remove_tree(path: Path, root: Path) -> None:
    """rmtree(path), only when path lies strictly below root (both resolved): a stale cache
    copy or an old checkpoint, never the place a hostile key points at."""
    path, root = Path(path), Path(root)
    real, real_root = path.resolve(), root.resolve()
    if path.is_symlink() or real == real_root or not real.is_relative_to(real_root):
        raise UserError(
            f"refusing to delete {path}: it is not a folder below {root}",
            fix="check the storage URI and the cache folder",
        )
    shutil.rmtree(real, ignore_errors=True)
