"""Local folders and S3-compatible object storage behind one small interface.

Credentials come only from boto3's standard chain (environment, profile, instance role);
they are never taken from the config, so they cannot end up in a saved config or a log.
"""

from __future__ import annotations

# Imports inside functions: boto3, botocore and pyarrow only for S3: local folders need none of
# them.
import contextlib
import os
from pathlib import Path
from urllib.parse import urlsplit

from distil.errors import UserError
from distil.secrets import check_uri, uri_problem
from distil.storage.paths import S3, check_relative, is_s3, regular_file, safe_join, symlink_in

__all__ = ["Storage", "check_endpoint_url", "check_storage_folder", "s3_errors", "safe_join", "split_s3"]


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ('bucket', 'a/b'); the prefix obeys the path rule (distil/storage/paths.py)."""
    rest = uri[len(S3) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"{uri!r} names no bucket", fix="write s3://BUCKET/PREFIX")
    check_relative(bucket, f"the bucket of {uri}")
    prefix = prefix.strip("/")
    if prefix:
        check_relative(prefix, f"the prefix of {uri}")
    return bucket, prefix


def endpoint_url_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint, or None. The message never repeats the URL: it may
    hold credentials (user:secret@host)."""

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http:// or https:// URL with a host (e.g. http://minio:9000)"
    credentials = uri_problem(url)
    if credentials:
        return (
            f"{credentials}: they would be written into saved configs and logs; "
            "give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead"
        )
    return None


def check_endpoint_url(url: str | None, where: str = "--endpoint-url") -> None:
    problem = url is not None and endpoint_url_problem(url)
    if problem:
        raise UserError(f"the S3 endpoint URL {problem}", where=where, fix="write it as http(s)://HOST[:PORT]")


@contextlib.contextmanager
def s3_errors(uri: str, endpoint_url: str | None):
    """Turn boto3's failures into one clear message (credentials are never part of it)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where = f"{uri}" + (f" at {endpoint_url}" if endpoint_url else "")
    try:
        yield
    except NoCredentialsError:
        raise UserError(
            f"no S3 credentials found for {where}",
            where="storage",
            fix="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (never in the config)",
        ) from None
    except EndpointConnectionError:
        raise UserError(
            f"cannot reach the S3 endpoint for {where}",
            where="storage.endpoint_url",
            fix="check the endpoint URL and that the store is up",
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        hint = {
            "NoSuchBucket": "create the bucket or correct its name",
            "InvalidAccessKeyId": "check the access key",
            "SignatureDoesNotMatch": "check the secret key",
            "AccessDenied": "grant the credentials access to this bucket/prefix",
        }.get(code, "check the URI and credentials")
        raise UserError(f"S3 refused {where}: {code}", where="storage", fix=hint) from None
    except BotoCoreError as e:
        raise UserError(
            f"S3 failure for {where}: {type(e).__name__}", where="storage", fix="check the endpoint and credentials"
        ) from None


def check_storage_folder(uri: str) -> None:
    """A local storage.uri must be a folder this process can write (or one it can create)."""
    path = Path(uri).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{existing} is a file, not a folder", where="storage.uri", fix="name a folder for the runs")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {existing}", where="storage.uri", fix="choose a folder you can write to")


MAX_ATTEMPTS = 10  # tries per S3 request when no config says (storage.max_attempts)


class Storage:
    """One storage location (a local folder or s3://bucket/prefix) and how to reach it: the
    endpoint, the region and the retry policy (`max_attempts` tries a request, exponential
    backoff), the same for boto3 here and for pyarrow (`arrow()`, what Ray Train writes with)."""

    def __init__(
        self, uri: str, endpoint_url: str | None = None, region: str | None = None, max_attempts: int = MAX_ATTEMPTS
    ):
        check_endpoint_url(endpoint_url)
        check_uri(uri, "storage URI")  # before it is repeated in any message
        self.uri = uri.rstrip("/")
        self.is_s3 = is_s3(uri)
        self.endpoint_url, self.region, self.max_attempts = endpoint_url, region, max_attempts
        if self.is_s3:
            self.bucket, self.prefix = split_s3(uri)
        self._clients: dict[int, object] = {}  # boto3 clients by pool size, made on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_clients": {}}  # (a client does not travel: made again where it is used)

    @classmethod
    def of(cls, section) -> "Storage":
        """The storage a config's `storage` section names."""
        return cls(section.uri, section.endpoint_url, section.region, section.max_attempts)

    def child(self, relative: str) -> "Storage":
        """A folder under this one (e.g. a run's), reached the same way."""
        check_relative(relative, f"a folder under {self.uri}")
        return self.elsewhere(f"{self.uri}/{relative}")

    def elsewhere(self, uri: str) -> "Storage":
        """Another location reached the same way (e.g. an s3:// data source beside the runs)."""
        return Storage(uri, self.endpoint_url, self.region, self.max_attempts)

    def local(self) -> Path:
        """The folder of a local location."""
        assert not self.is_s3, self.uri
        return Path(self.uri).expanduser()

    def arrow(self):
        """(path, pyarrow filesystem) as Ray Train's RunConfig and pyarrow's copy_files take them:
        an absolute local path and None, or "bucket/prefix" and an S3 filesystem with this
        storage's endpoint, region and retries."""
        if not self.is_s3:
            return str(self.local().resolve()), None
        from distil.storage.arrow_fs import s3_filesystem

        filesystem = s3_filesystem(self.endpoint_url, self.region, self.max_attempts)
        return f"{self.bucket}/{self.prefix}".rstrip("/"), filesystem

    def check_writable(self) -> None:
        """Before a run writes anything: a local folder this process can write (or create), or an
        S3 prefix where a marker object is written, read back and deleted -- a bad endpoint,
        wrong credentials or a missing bucket are one message (UserError), nothing left behind."""
        if not self.is_s3:
            check_storage_folder(self.uri)
            return
        key = self.key(f".distil-preflight-{os.getpid()}")
        with s3_errors(self.uri, self.endpoint_url):
            client = self.client()
            client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
            try:
                if client.get_object(Bucket=self.bucket, Key=key)["Body"].read() != b"ok":
                    raise UserError(f"{self.uri}: the marker object read back differs", where="storage")
            finally:
                client.delete_object(Bucket=self.bucket, Key=key)

    def client(self, max_pool_connections: int = 10):
        """This location's boto3 client, made once per pool size and kept: making one takes ~0.1 s
        of CPU (a heartbeat every 2 s made one each time), and a client is thread-safe."""
        if max_pool_connections not in self._clients:
            self._clients[max_pool_connections] = self._new_client(max_pool_connections)
        return self._clients[max_pool_connections]

    def _new_client(self, max_pool_connections: int):
        import boto3
        from botocore.config import Config

        # "standard" retries: exponential backoff with jitter on throttling, 5xx and dropped connections.
        config = Config(
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},  # tries, the first included
            max_pool_connections=max_pool_connections,
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def list_objects(self) -> list[dict]:
        """{"key" (relative to the prefix), "size", "mtime" (epoch s), "etag", "link"} of every object
        under it. Every key obeys the path rule (distil/storage/paths.py): one that does not is refused,
        named. `link`: a local file reached through a symbolic link (its target is never read)."""
        if not self.is_s3:
            root = self.local()
            if not root.is_dir():
                raise UserError(f"{self.uri} is not a folder", fix="give a run folder or its parent, or an s3:// URI")
            out = []
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    rel = f.relative_to(root).as_posix()
                    st = f.lstat()
                    out.append(
                        {
                            "key": rel,
                            "size": st.st_size,
                            "mtime": st.st_mtime,
                            "etag": None,
                            "link": symlink_in(root, rel) is not None,
                        }
                    )
            return out
        out = []
        base = f"{self.prefix}/" if self.prefix else ""
        with s3_errors(self.uri, self.endpoint_url):
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out += [
                    {
                        "key": o["Key"][len(base) :],
                        "size": o["Size"],
                        "mtime": o["LastModified"].timestamp(),
                        "etag": o["ETag"],
                        "link": False,
                    }
                    for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")
                ]
        for o in out:
            check_relative(o["key"], f"object key under {self.uri}:")
        return out

    def list_keys(self) -> list[tuple[str, int]]:
        """(key relative to the prefix, size) of every object under it."""
        return [(o["key"], o["size"]) for o in self.list_objects()]

    def read_bytes(self, relative: str) -> bytes:
        if not self.is_s3:
            return regular_file(self.local(), relative, "file").read_bytes()
        with s3_errors(self.uri, self.endpoint_url):
            return self.client().get_object(Bucket=self.bucket, Key=self.key(relative))["Body"].read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """One small object or file, whole or not at all: S3's PUT is atomic; a local file is
        written beside and renamed over."""
        check_relative(relative, "file")
        if not self.is_s3:
            target = safe_join(self.local(), relative, "file")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        with s3_errors(self.uri, self.endpoint_url):
            self.client().put_object(Bucket=self.bucket, Key=self.key(relative), Body=data)

    def download_tree(self, cache_root: Path) -> Path:
        """Mirror the prefix into cache_root/bucket/prefix; objects already there with the same size are kept."""
        dest = Path(cache_root) / self.bucket / self.prefix
        client = self.client()
        keys = self.list_keys()
        if not keys:
            raise UserError(f"nothing under {self.uri}", fix="check the bucket and prefix")
        for rel, size in keys:
            target = safe_join(dest, rel)
            if target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            with s3_errors(self.uri, self.endpoint_url):
                client.download_file(self.bucket, self.key(rel), str(tmp))
            os.replace(tmp, target)
        return dest

    def move(self, src: str, dst: str) -> int:
        """Move everything under src to dst (both relative to the URI, both obeying the path
        rule); returns the objects moved. Local: one rename. S3 has no rename: each object is
        copied (server side, multipart for large ones), and the originals are deleted only once
        every copy exists, so an interrupted move leaves the run where it was."""
        check_relative(src, "run folder")
        check_relative(dst, "destination folder")
        if not self.is_s3:
            root = self.local()
            if (root / dst).exists():
                raise UserError(f"{root / dst} exists already", fix="try again in a second")
            os.replace(root / src, root / dst)
            return 1
        moved = [key for key, _ in self.child(src).list_keys()]
        with s3_errors(self.uri, self.endpoint_url):
            client = self.client()
            for rel in moved:
                client.copy(
                    {"Bucket": self.bucket, "Key": self.key(f"{src}/{rel}")}, self.bucket, self.key(f"{dst}/{rel}")
                )
            for i in range(0, len(moved), 1000):  # DeleteObjects takes 1000 keys a request
                client.delete_objects(
                    Bucket=self.bucket,
                    Delete={
                        "Objects": [{"Key": self.key(f"{src}/{rel}")} for rel in moved[i : i + 1000]],
                        "Quiet": True,
                    },
                )
        return len(moved)
