"""s3:// data sources against a real S3 HTTP endpoint (moto_server on loopback)."""

import boto3
import pytest

from distil.config import DataSection
from distil.data import load_documents
from distil.errors import UserError
from tests.conftest import EN_TEXT, PL_TEXT


def test_s3_prefix_loads_like_local_files(tmp_path, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="corpus")
    s3.upload_file(str(EN_TEXT), "corpus", "text/en/a.txt")
    s3.upload_file(str(PL_TEXT), "corpus", "text/pl/b.txt")
    s3.put_object(Bucket="corpus", Key="other/c.txt", Body=b"not under the prefix\n")
    cfg = DataSection(sources=["s3://corpus/text"], cache_dir=str(tmp_path / "cache"))
    docs = list(load_documents(cfg, {"endpoint_url": s3_endpoint})["text"])
    local = list(load_documents(DataSection(sources=[str(EN_TEXT), str(PL_TEXT)], cache_dir=str(tmp_path / "c2")))["text"])
    assert docs == local
    # A second load reuses the downloaded copy.
    assert list(load_documents(cfg, {"endpoint_url": s3_endpoint})["text"]) == docs


def test_s3_errors_are_clear(tmp_path, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="empty")
    cfg = DataSection(sources=["s3://empty/nothing"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="nothing under s3://empty/nothing"):
        load_documents(cfg, {"endpoint_url": s3_endpoint})
    with pytest.raises(UserError, match="no-such-bucket"):
        load_documents(DataSection(sources=["s3://no-such-bucket/x"], cache_dir=str(tmp_path / "c")), {"endpoint_url": s3_endpoint})
