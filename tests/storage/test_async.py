"""evods.storage.AsyncUploader: uploads in the background, keeps what it could not upload, cleans up after itself."""

import logging
import os
import subprocess
import threading

import pytest

from evods.storage import AsyncUploader, AsyncUploadError, StorageError, open_storage
from testkit.s3_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    create_bucket,
    start_moto_server,
)


class GatedStorage:
    """Real storage whose uploads wait for `gate`, so a test can look at an upload while it is in flight."""

    def __init__(self, storage):
        self.storage = storage
        self.gate = threading.Event()

    def upload_file(self, local_path, rel, on_bytes=None):
        assert self.gate.wait(timeout=10), "the test never opened the gate"
        self.storage.upload_file(local_path, rel, on_bytes)

    def uri(self, rel=""):
        return self.storage.uri(rel)


def write_temp(uploader: AsyncUploader, name: str, data: bytes) -> str:
    """What the checkpoint code does: write the file into the uploader's temp folder."""
    path = uploader.temp_path(name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_submit_returns_at_once_and_wait_finishes_the_upload(s3_endpoint, tmp_path):
    storage = open_storage(s3_endpoint.path("run"))
    gated = GatedStorage(storage)
    uploader = AsyncUploader(gated, tmp_path / "tmp")
    local = write_temp(uploader, "model_tp0_pp0.pt", b"weights")

    uploader.submit(local, "10/model_tp0_pp0.pt")
    assert uploader.pending == 1  # submit did not wait for the upload
    assert not storage.exists("10/model_tp0_pp0.pt")

    gated.gate.set()
    uploader.wait()
    assert uploader.pending == 0
    assert storage.read_bytes("10/model_tp0_pp0.pt") == b"weights"
    assert os.listdir(tmp_path / "tmp") == []  # the temp file is deleted once uploaded
    uploader.close()


def test_closing_waits_for_every_upload(s3_endpoint, tmp_path):
    storage = open_storage(s3_endpoint.path("run"))
    with AsyncUploader(storage, tmp_path / "tmp", workers=2) as uploader:
        for rank in range(6):
            name = f"model_tp{rank}_pp0.pt"
            uploader.submit(write_temp(uploader, name, bytes([rank]) * 1000), f"20/{name}")
    assert storage.list("20") == [f"model_tp{rank}_pp0.pt" for rank in range(6)]
    assert storage.read_bytes("20/model_tp5_pp0.pt") == bytes([5]) * 1000
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(RuntimeError, match="closed"):
        uploader.submit(write_temp(uploader, "late.pt", b"x"), "20/late.pt")


@pytest.fixture
def doomed_server(s3_endpoint):
    """A moto server of its own, so that a test can stop it (s3_endpoint provides the credentials)."""
    server = start_moto_server()
    yield server
    server.stop()  # a second stop is harmless


def test_storage_going_away_keeps_the_data_and_fails_clearly(doomed_server, tmp_path, caplog):
    host, port = doomed_server.get_host_and_port()
    storage = open_storage(f"boto3:s3://{create_bucket(f'http://{host}:{port}')}.{host}:{port}/run", max_attempts=1)
    uploader = AsyncUploader(storage, tmp_path / "tmp", attempts=2, retry_backoff_s=0.01)
    uploader.submit(write_temp(uploader, "model_tp0_pp0.pt", b"first"), "10/model_tp0_pp0.pt")
    uploader.wait()

    doomed_server.stop()
    uploader.submit(write_temp(uploader, "model_tp0_pp0.pt", b"second"), "20/model_tp0_pp0.pt")
    with caplog.at_level(logging.WARNING, logger="evods.storage"), pytest.raises(AsyncUploadError) as error:
        uploader.wait()

    [failure] = error.value.failures
    assert failure.uri == storage.uri("20/model_tp0_pp0.pt")
    with open(failure.local_path, "rb") as f:
        assert f.read() == b"second"  # nothing is lost
    message = str(error.value)
    assert f"{failure.uri}: failed after 2 attempts" in message
    assert f"kept at {failure.local_path}" in message
    assert f"no answer from http://{host}:{port}" in message
    assert "failed (attempt 1 of 2), retrying" in caplog.text
    assert SECRET_ACCESS_KEY not in message + caplog.text and ACCESS_KEY_ID not in message + caplog.text
    uploader.close()  # the failure was reported once; nothing is pending


def finished_process_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_start_removes_only_temp_files_of_finished_runs(tmp_path, caplog):
    folder = tmp_path / "tmp"
    folder.mkdir()
    dead, alive = finished_process_pid(), os.getpid()
    leftovers = {
        f"model_tp0_pp0.pt.{dead}.0a1b.tmpfile": False,  # from a run that crashed: removed
        f"model_tp0_pp0.pt.{alive}.0a1b.tmpfile": True,  # another rank on this host is writing it: kept
        f"model_tp1_pp0.pt.{dead}.0a1b.not-uploaded": True,  # a failed upload's data: kept, and reported
        "notes.txt": True,  # not ours
    }
    for name in leftovers:
        (folder / name).write_bytes(b"x")

    with caplog.at_level(logging.WARNING, logger="evods.storage"):
        AsyncUploader(open_storage(str(tmp_path / "ckpt")), folder).close()

    assert sorted(os.listdir(folder)) == sorted(name for name, kept in leftovers.items() if kept)
    assert f"model_tp1_pp0.pt.{dead}.0a1b.not-uploaded" in caplog.text


def test_start_refuses_a_temp_folder_without_space(tmp_path):
    with pytest.raises(StorageError, match=f"GiB free in {tmp_path}.*async_upload_tmp_folder"):
        AsyncUploader(open_storage(str(tmp_path / "ckpt")), tmp_path, min_free_gib=1e12)
