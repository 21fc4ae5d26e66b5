"""s3:// data sources against a real S3 HTTP endpoint (moto_server on loopback): listed, cut into
ranges and read range by range (byte-range reads through pyarrow's S3 filesystem) exactly as
local files are; bad prefixes are refused clearly."""

import boto3
import pytest

from distil.config.schema import DistilConfig
from distil.data import corpus, prepared
from distil.errors import UserError
from tests.conftest import EN_TEXT, PL_TEXT


def _config(tmp_path, sources, endpoint):
    return DistilConfig.model_validate(
        {
            "teacher": {"name_or_path": "unused"},
            "student": {"layers": [0]},
            "data": {"sources": sources, "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1},
            "storage": {"uri": str(tmp_path / "runs"), "endpoint_url": endpoint},
        }
    )


def _documents(cfg, range_bytes):
    reading = corpus.Reading(endpoint_url=cfg.storage.endpoint_url, region="us-east-1")
    out = []
    for entry in prepared.source_listing(cfg):
        s3 = entry["name"].startswith("s3://")
        for r in corpus.file_ranges(entry["name"].removeprefix("s3://"), entry["size"], s3, reading, range_bytes):
            out += corpus.read(r, reading)
    return out


def test_s3_prefix_reads_like_local_files(tmp_path, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="corpus")
    s3.upload_file(str(EN_TEXT), "corpus", "text/en/a.txt")
    s3.upload_file(str(PL_TEXT), "corpus", "text/pl/b.txt")
    s3.put_object(Bucket="corpus", Key="text/README.md", Body=b"not a corpus file\n")
    s3.put_object(Bucket="corpus", Key="other/c.txt", Body=b"not under the prefix\n")
    remote = _config(tmp_path, ["s3://corpus/text"], s3_endpoint)
    assert [e["name"] for e in prepared.source_listing(remote)] == [
        "s3://corpus/text/en/a.txt",
        "s3://corpus/text/pl/b.txt",
    ]
    local = _documents(_config(tmp_path, [str(EN_TEXT), str(PL_TEXT)], None), 1 << 20)
    assert _documents(remote, 5000) == local and len(local) > 1000  # ~60 ranged reads


def test_s3_errors_are_clear(tmp_path, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="empty")
    with pytest.raises(UserError, match="s3://empty/nothing holds no"):
        prepared.source_listing(_config(tmp_path, ["s3://empty/nothing"], s3_endpoint))
    with pytest.raises(UserError, match="no-such-bucket"):
        prepared.source_listing(_config(tmp_path, ["s3://no-such-bucket/x"], s3_endpoint))
