"""The pyarrow filesystem Ray Train stores a run's checkpoints through, for S3-compatible stores.

Ray pickles the filesystem to its controller and to every worker, and pyarrow's
`S3FileSystem` drops its `retry_strategy` when pickled (26.0: `__reduce__` leaves it out), so
an S3FileSystem handed to Ray gives up after pyarrow's default 3 tries, about 2 s of an
unreachable store, wherever it runs; a failed write of Ray's own checkpoint records then fails
the whole run. Here the S3FileSystem is made where it is used, from options that pickle,
behind pyarrow's `PyFileSystem`: the streams it returns are still pyarrow's native ones.
"""

from __future__ import annotations

# Imports inside functions: boto3 only to resolve a region.
from pyarrow import fs


class RetryingS3Handler(fs.FileSystemHandler):
    """Delegates every call to an S3FileSystem built with `max_attempts` tries per request."""

    def __init__(self, endpoint_url: str | None, region: str | None, max_attempts: int):
        self.options = {"endpoint_url": endpoint_url, "region": region, "max_attempts": max_attempts}
        self._fs: fs.S3FileSystem | None = None

    def __getstate__(self) -> dict:
        return {"options": self.options}  # credentials are resolved where it runs, never pickled

    def __setstate__(self, state: dict) -> None:
        self.options, self._fs = state["options"], None

    @property
    def s3(self) -> fs.S3FileSystem:
        if self._fs is None:
            o = self.options
            self._fs = fs.S3FileSystem(
                endpoint_override=o["endpoint_url"],
                region=o["region"] or default_region(),
                scheme="http" if (o["endpoint_url"] or "").startswith("http://") else "https",
                retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=o["max_attempts"]),
            )
        return self._fs

    def get_type_name(self) -> str:
        return "distil-s3"

    def normalize_path(self, path):
        return self.s3.normalize_path(path)

    def get_file_info(self, paths):
        return self.s3.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.s3.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.s3.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.s3.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.s3.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.s3.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.s3.delete_file(path)

    def move(self, src, dest):
        self.s3.move(src, dest)

    def copy_file(self, src, dest):
        self.s3.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.s3.open_input_stream(path)

    def open_input_file(self, path):
        return self.s3.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.s3.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.s3.open_append_stream(path, metadata=metadata)


def default_region() -> str:
    """The region boto3 resolves where this runs (AWS_REGION, AWS_DEFAULT_REGION, the profile):
    pyarrow needs one named. S3-compatible stores accept any; us-east-1 when none is set."""
    import boto3

    return boto3.session.Session().region_name or "us-east-1"


def s3_filesystem(endpoint_url: str | None, region: str | None, max_attempts: int) -> fs.PyFileSystem:
    return fs.PyFileSystem(RetryingS3Handler(endpoint_url, region, max_attempts))
