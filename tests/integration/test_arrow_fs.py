"""The pyarrow filesystem handed to Ray Train for s3:// storage, against moto_server on loopback."""

import pickle
import time

import boto3
import pytest
from pyarrow import fs

from distil.storage.arrow_fs import s3_filesystem


def test_retries_survive_pickling_and_credentials_do_not_travel(s3_endpoint, tmp_path):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="arrow")
    shipped = pickle.dumps(s3_filesystem(s3_endpoint, "us-east-1", 7))  # as Ray ships it to its actors
    assert b"testing" not in shipped  # the secret in the environment is looked up where it runs
    remote = pickle.loads(shipped)
    assert remote.handler.options == {"endpoint_url": s3_endpoint, "region": "us-east-1", "max_attempts": 7}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "a.pt").write_bytes(b"x" * 100_000)
    fs.copy_files(str(tmp_path / "ckpt"), "arrow/run/step_00000001", destination_filesystem=remote)
    assert remote.get_file_info("arrow/run/step_00000001/a.pt").size == 100_000
    with remote.open_input_stream("arrow/run/step_00000001/a.pt") as f:
        assert f.read() == b"x" * 100_000


def test_a_store_that_resets_every_connection_is_tried_max_attempts_times():
    """pyarrow's default is 3 tries (about 2 s of an outage); the configured count is used, also
    on the far side of a pickle."""
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    tries = []

    def reset_all():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            tries.append(time.perf_counter())
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=reset_all, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    remote = pickle.loads(pickle.dumps(s3_filesystem(url, "us-east-1", 5)))
    try:
        with pytest.raises(OSError):  # every connection was reset
            remote.get_file_info("bucket/key")
    finally:
        listener.close()
    assert len(tries) == 5
