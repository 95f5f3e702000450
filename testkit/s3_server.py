"""A real S3 server for tests: moto over HTTP on 127.0.0.1, with a fresh bucket per test.

Its fixtures (`moto_server`, `s3_endpoint`) reach every test through `pytest_plugins` in tests/conftest.py.
"""

import itertools
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

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


@dataclass(frozen=True)
class S3Request:
    """One request as the server saw it: who sent it (the rank in evods' User-Agent), what, and the bytes of the
    response body."""

    rank: int | None
    method: str
    bucket: str
    key: str
    status: int
    body_bytes: int


class _RequestLog:
    """WSGI middleware in front of moto's app that records every request (S3Request), counted at the server."""

    def __init__(self, app):
        self.app = app
        self.requests: list[S3Request] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        status = []

        def start_response_seen(code, headers, exc_info=None):
            status.append(int(code.split()[0]))
            return start_response(code, headers, exc_info)

        body = self.app(environ, start_response_seen)
        size = 0
        try:
            for chunk in body:
                size += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            bucket, _, key = urllib.parse.unquote(environ.get("PATH_INFO", "")).lstrip("/").partition("/")
            rank = re.search(r"evods-rank/(\d+)", environ.get("HTTP_USER_AGENT", ""))
            with self._lock:
                self.requests.append(S3Request(int(rank.group(1)) if rank else None, environ["REQUEST_METHOD"],
                                               bucket, key, status[0] if status else 0, size))


class CountingMotoServer:
    """A moto server on 127.0.0.1 that records every request it serves (`requests(bucket)`). It shares its data with
    the other moto servers of the process."""

    def __init__(self):
        self._log = _RequestLog(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self._log, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def get_host_and_port(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), port

    def requests(self, bucket: str) -> list[S3Request]:
        with self._log._lock:
            return [request for request in self._log.requests if request.bucket == bucket]

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


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
