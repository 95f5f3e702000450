"""A real S3 server for tests: moto over HTTP on 127.0.0.1, with a fresh bucket per test.

Use from a test module with `from tests.s3_server import moto_server, s3_endpoint  # noqa: F401` (pytest finds
fixtures by the names in the module).
"""

import itertools
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

ACCESS_KEY_ID = "AKIAEVODSTESTKEY0001"
SECRET_ACCESS_KEY = "evods-test-secret-8d41c7e2b9"
_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Endpoint:
    host: str
    port: int
    bucket: str  # exists and is empty

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def path(self, prefix: str = "") -> str:
        """The InternEvo form boto3:s3://bucket.host:port/prefix of a folder in this test's bucket."""
        return f"boto3:s3://{self.bucket}.{self.host}:{self.port}/{prefix}"

    def client(self):
        """A plain boto3 client of the server, to check what the code under test stored."""
        return s3_client(self.url)


def start_moto_server() -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server


def s3_client(endpoint_url: str):
    return boto3.client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY
    )


def create_bucket(endpoint_url: str) -> str:
    """A new bucket; the name is unique in the process because moto servers in one process share their data."""
    bucket = f"evods-test-{next(_bucket_numbers)}"
    s3_client(endpoint_url).create_bucket(Bucket=bucket)
    return bucket


@contextmanager
def moto_checks_credentials(endpoint_url: str) -> Iterator[None]:
    """Make the server refuse unknown access keys (moto accepts any by default), for the duration of the block."""

    def set_free_requests(count: bytes) -> None:
        request = urllib.request.Request(
            f"{endpoint_url}/moto-api/reset-auth", data=count, method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=5).close()

    set_free_requests(b"0")
    try:
        yield
    finally:
        set_free_requests(b"inf")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[tuple[str, int]]:
    server = start_moto_server()
    yield server.get_host_and_port()
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server, monkeypatch) -> S3Endpoint:
    """The running server, a fresh bucket in it, and its credentials in InternEvo's environment variables."""
    monkeypatch.setenv("S3_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY_ID", SECRET_ACCESS_KEY)
    for proxy_variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy_variable, raising=False)
    host, port = moto_server
    return S3Endpoint(host, port, create_bucket(f"http://{host}:{port}"))
