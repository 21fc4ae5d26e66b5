"""One storage location type: a config's storage section gives the run's folder, and boto3
and pyarrow (what Ray Train writes with) reach it with the same endpoint and retry policy."""

from __future__ import annotations

import socket

import pytest

from distil.config.schema import DistilConfig
from tests.conftest import base_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_storage_max_attempts_is_what_boto3_and_pyarrow_do(tmp_path, teacher_dir, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = DistilConfig.model_validate(
        base_config(
            teacher_dir, tmp_path, storage={"uri": "s3://bucket/runs/", "endpoint_url": endpoint, "max_attempts": 3}
        )
    )
    run = cfg.run_storage()
    assert (run.uri, run.bucket, run.prefix) == ("s3://bucket/runs/t", "bucket", "runs/t")
    sent = []
    client = run.client()
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    with pytest.raises(EndpointConnectionError):
        client.head_object(Bucket=run.bucket, Key=run.key("COMPLETE"))
    assert len(sent) == 3  # storage.max_attempts tries (it was always 10 for boto3)
    path, filesystem = run.arrow()
    assert path == "bucket/runs/t" and filesystem.handler.options == {
        "endpoint_url": endpoint,
        "region": None,
        "max_attempts": 3,
    }
    local = DistilConfig.model_validate(base_config(teacher_dir, tmp_path)).run_storage()
    assert not local.is_s3 and local.arrow() == (str((tmp_path / "runs" / "t").resolve()), None)
    assert run.child("step_00000003").elsewhere("s3://other/data").max_attempts == 3
