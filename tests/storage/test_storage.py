"""evods.storage: path parsing, the same behaviour from the local and the S3 backend, and the launch-time ping."""

import os
import socket
import threading
import time

import pytest

from evods.storage import (
    LocalLocation,
    LocalStorage,
    S3Location,
    StorageError,
    open_storage,
    parse_storage_path,
)
from evods.storage.local import atomic_write
from testkit.bad_endpoints import NotFoundEndpoint, StallingEndpoint
from testkit.s3_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    moto_checks_credentials,
)

MiB = 1024 * 1024


def assert_no_secret(text: str) -> None:
    assert SECRET_ACCESS_KEY not in text and ACCESS_KEY_ID not in text, text


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- path parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["local:/data/ckpt", "/data/ckpt", "local:/data/ckpt/"])
def test_local_paths(path):
    assert parse_storage_path(path) == LocalLocation("/data/ckpt")


def test_local_paths_may_be_relative_or_contain_colons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_storage_path("ckpt") == LocalLocation(str(tmp_path / "ckpt"))
    assert parse_storage_path("/data/run:1/ckpt") == LocalLocation("/data/run:1/ckpt")


def test_internevo_s3_path_with_ip():
    assert parse_storage_path("boto3:s3://model_weights.10.1.2.3/internlm/snapshot/1/") == S3Location(
        "model_weights", "internlm/snapshot/1", "http://10.1.2.3:80"
    )


@pytest.mark.parametrize(
    "path, bucket, endpoint_url",
    [
        ("boto3:s3://ckpt.10.1.2.3:9000/run", "ckpt", "http://10.1.2.3:9000"),
        ("boto3:s3://ckpt.minio.internal:9000/run", "ckpt", "http://minio.internal:9000"),
        ("boto3:s3://ckpt.minio.internal/run", "ckpt", "http://minio.internal:80"),
        # InternEvo's lstrip("s3://") turned these into "data", "x" and "" (it strips characters, not a prefix).
        ("boto3:s3://s3data.10.1.2.3/run", "s3data", "http://10.1.2.3:80"),
        ("boto3:s3://3x.10.1.2.3/run", "3x", "http://10.1.2.3:80"),
        ("boto3:s3://ss3.10.1.2.3/run", "ss3", "http://10.1.2.3:80"),
    ],
)
def test_internevo_s3_path_variants(path, bucket, endpoint_url):
    assert parse_storage_path(path) == S3Location(bucket, "run", endpoint_url)


def test_plain_s3_path_takes_its_endpoint_from_the_option_or_the_environment(monkeypatch):
    for variable in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)
    assert parse_storage_path("s3://s3bucket/a/b") == S3Location("s3bucket", "a/b", None)  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    assert parse_storage_path("s3://b/p").endpoint_url == "http://aws-env:1"
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://s3-env:2")
    assert parse_storage_path("s3://b/p").endpoint_url == "http://s3-env:2"
    assert parse_storage_path("s3://b/p", endpoint_url="http://config:3").endpoint_url == "http://config:3"
    assert parse_storage_path("s3://b").prefix == ""


@pytest.mark.parametrize(
    "path, message",
    [
        ("oss://bucket/prefix", "unknown scheme 'oss'"),
        ("boto3:bucket.10.1.2.3/prefix", "expected s3://"),
        ("boto3:s3://bucket/prefix", "need BUCKET.ENDPOINT"),
        ("boto3:s3://.10.1.2.3/prefix", "need BUCKET.ENDPOINT"),
        ("boto3:s3://bucket.10.1.2.3:http/prefix", "is not HOST or HOST:PORT"),
        ("s3:///prefix", "names no bucket"),
        ("local:", "names no folder"),
    ],
)
def test_bad_paths_say_what_is_accepted(path, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_storage_path(path)
    if "unknown scheme" in message:
        for form in ("local:/", "boto3:s3://BUCKET.ENDPOINT/prefix", "s3://BUCKET/prefix"):
            assert form in str(error.value)


def test_an_internevo_path_names_its_endpoint_only_once():
    with pytest.raises(ValueError, match="already names its endpoint"):
        parse_storage_path("boto3:s3://b.10.1.2.3/p", endpoint_url="http://other:9000")


# ---- one behaviour, both backends -----------------------------------------------------------------------------------

SMALL_MULTIPART = {"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}  # 5 MiB: S3's smallest part


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """The same folder on each backend, opened from a path as a config would give it."""
    if request.param == "local":
        return open_storage(f"local:{tmp_path}/ckpt", **SMALL_MULTIPART)
    return open_storage(request.getfixturevalue("s3_endpoint").path("runs/7b"), **SMALL_MULTIPART)


def test_write_read_list_exists(storage):
    storage.write_bytes("100/model_tp0_pp0.pt", b"weights")
    storage.write_bytes("100/100.step", b"marker")
    storage.write_bytes("snapshot/1/context.pt", b"ctx")
    storage.write_bytes("config_file.pt", b"cfg")

    assert storage.read_bytes("100/model_tp0_pp0.pt") == b"weights"
    storage.write_bytes("100/model_tp0_pp0.pt", b"newer")
    assert storage.read_bytes("/100//model_tp0_pp0.pt") == b"newer"

    assert storage.list() == ["100", "config_file.pt", "snapshot"]
    assert storage.list("100") == ["100.step", "model_tp0_pp0.pt"]
    assert storage.list("snapshot/") == ["1"]
    assert storage.list("200") == []

    assert storage.exists("100/100.step")
    assert not storage.exists("100")  # folders are not files
    assert not storage.exists("200/200.step")
    with pytest.raises(FileNotFoundError, match="200.step"):
        storage.read_bytes("200/200.step")


def test_delete_and_delete_prefix(storage):
    for rel in ("10/a.pt", "10/10.step", "100/a.pt", "100/100.step"):
        storage.write_bytes(rel, b"x")

    storage.delete("100/a.pt")
    storage.delete("100/a.pt")  # already gone: no error
    assert storage.list("100") == ["100.step"]

    storage.delete_prefix("10")  # must not touch 100/, whose name starts with "10"
    assert storage.list() == ["100"]
    storage.delete_prefix("10")  # already gone: no error
    with pytest.raises(ValueError, match="whole root"):
        storage.delete_prefix("/")
    assert storage.list() == ["100"]

    storage.delete("100/100.step")
    assert storage.list() == []  # a folder lasts only as long as its files, on both backends


def test_paths_cannot_leave_the_root(storage):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.write_bytes("../outside.pt", b"x")


def test_upload_and_download_of_a_multipart_sized_file(storage, request, tmp_path):
    data = os.urandom(11 * MiB)
    source, copy = tmp_path / "model.pt", tmp_path / "downloads" / "model.pt"
    source.write_bytes(data)

    storage.upload_file(source, "50/model_tp0_pp0.pt")
    storage.download_file("50/model_tp0_pp0.pt", copy)

    assert copy.read_bytes() == data
    assert storage.read_bytes("50/model_tp0_pp0.pt") == data
    with pytest.raises(FileNotFoundError):
        storage.download_file("50/missing.pt", tmp_path / "missing.pt")
    if not isinstance(storage, LocalStorage):
        s3_endpoint = request.getfixturevalue("s3_endpoint")
        etag = s3_endpoint.client().head_object(Bucket=s3_endpoint.bucket, Key="runs/7b/50/model_tp0_pp0.pt")["ETag"]
        assert etag.strip('"').endswith("-3")  # an S3 multipart ETag ends with the part count: 5 + 5 + 1 MiB


def test_uri_names_the_place(tmp_path, s3_endpoint):
    assert open_storage(str(tmp_path)).uri("100/100.step") == f"{tmp_path}/100/100.step"
    s3 = open_storage(s3_endpoint.path("runs/7b/"))
    assert s3.uri("100/100.step") == f"s3://{s3_endpoint.bucket}/runs/7b/100/100.step"


def test_local_write_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"complete old checkpoint")

    def crash_halfway(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash_halfway)
    assert target.read_bytes() == b"complete old checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]


# ---- ping, errors and secrets ---------------------------------------------------------------------------------------


def test_ping_passes_and_leaves_nothing_behind(storage):
    storage.ping()
    assert storage.list() == []


def test_ping_through_a_host_name_endpoint(s3_endpoint):
    # A host name instead of an IP, as for a MinIO or Ceph server known by name.
    open_storage(f"boto3:s3://{s3_endpoint.bucket}.localhost:{s3_endpoint.port}/run").ping()


def test_ping_fails_fast_for_a_missing_bucket(s3_endpoint):
    storage = open_storage(f"boto3:s3://nobucket.{s3_endpoint.host}:{s3_endpoint.port}/run")
    start = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.ping()
    assert time.monotonic() - start < 5
    assert f"bucket 'nobucket' does not exist at {s3_endpoint.url}" in str(error.value)
    assert_no_secret(str(error.value))


def test_ping_fails_fast_when_nothing_listens(s3_endpoint):
    endpoint = f"127.0.0.1:{closed_port()}"
    storage = open_storage(f"boto3:s3://{s3_endpoint.bucket}.{endpoint}/run")  # default retries and timeouts
    start = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.ping()
    assert time.monotonic() - start < 8
    assert f"no answer from http://{endpoint}" in str(error.value)
    assert "check the endpoint" in str(error.value)
    assert_no_secret(str(error.value))


def storage_at(url: str):
    """A folder at an endpoint given as http://host:port, in InternEvo's path form."""
    return open_storage(f"boto3:s3://bucket.{url.removeprefix('http://')}/run")


def failure_of(action) -> tuple[float, str]:
    """(seconds until `action` raised StorageError, its message)."""
    start = time.monotonic()
    with pytest.raises(StorageError) as error:
        action()
    return time.monotonic() - start, str(error.value)


def test_a_hung_endpoint_fails_within_half_a_minute_by_default_and_sooner_when_configured(s3_endpoint, monkeypatch,
                                                                                        tmp_path):
    with StallingEndpoint() as hung, StallingEndpoint(answer_head=True) as hung_after_head:
        defaults = storage_at(hung.url)  # 3 attempts of 6 s each
        outcome = {}
        ping = threading.Thread(target=lambda: outcome.update(default=failure_of(defaults.ping)))
        ping.start()  # meanwhile, the configured bounds

        monkeypatch.setenv("EVODS_S3_READ_TIMEOUT", "1")
        monkeypatch.setenv("EVODS_S3_MAX_ATTEMPTS", "2")
        # the size check (HEAD) is answered, the GET is not: s3transfer's own five download attempts would multiply
        # the wait by five
        seconds, message = failure_of(lambda: storage_at(hung_after_head.url).download_file("x", tmp_path / "x"))
        assert seconds < 6, seconds
        assert message == (f"S3 download of s3://bucket/run/x at {hung_after_head.url} failed: {hung_after_head.url} "
                           "accepted the connection but sent no answer within 1 s (2 attempts); what to check: that "
                           "the endpoint is an S3 server and is up (not a hung server or proxy); on a slow storage "
                           "raise EVODS_S3_READ_TIMEOUT (seconds) or EVODS_S3_MAX_ATTEMPTS")
        monkeypatch.setenv("EVODS_S3_READ_TIMEOUT", "soon")
        assert failure_of(lambda: storage_at(hung.url))[1] == \
            "EVODS_S3_READ_TIMEOUT='soon': give a number of seconds above 0 (default 6.0)"
        ping.join()
    seconds, message = outcome["default"]
    assert 18 <= seconds <= 30, seconds
    assert f"{hung.url} accepted the connection but sent no answer within 6 s (3 attempts)" in message
    assert "\n" not in message
    assert_no_secret(message)


@pytest.mark.parametrize("body, answer", [
    (b"", "HTTP 404 with an empty body"),
    (b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>",
     "HTTP 404 with an HTML page titled '404 Not Found'"),
])
def test_an_endpoint_that_answers_404_is_one_line_that_says_what_answered(s3_endpoint, body, answer, tmp_path, capsys):
    from evods.cli.convert2hf import main as convert2hf

    with NotFoundEndpoint(body) as web_server:
        ping_message = failure_of(storage_at(web_server.url).ping)[1]
        code = convert2hf(["--src", f"boto3:s3://bucket.{web_server.url.removeprefix('http://')}/ckpt/10",
                           "--tgt", str(tmp_path / "hf")])
    assert ping_message.startswith("S3 write of s3://bucket/run/pings/") and "\n" not in ping_message
    assert f"failed: {web_server.url} answered {answer} (server: BaseHTTP" in ping_message
    assert ping_message.endswith("not an S3 error; what to check: the endpoint must be the S3 service itself (scheme, "
                                 "host and port, no path: boto3:s3://BUCKET.HOST:PORT/prefix, or S3_ENDPOINT_URL for "
                                 "s3:// paths), and bucket 'bucket' must exist there")
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.split(": ", 1)[1].startswith(f"S3 listing of s3://bucket/ckpt/10 at {web_server.url} failed: "
                          f"{web_server.url} answered {answer}")
    assert not (tmp_path / "hf").exists()


def test_ping_fails_for_credentials_the_server_rejects(s3_endpoint):
    storage = open_storage(s3_endpoint.path("run"))
    with moto_checks_credentials(s3_endpoint.url), pytest.raises(StorageError) as error:
        storage.ping()
    assert "rejected the credentials" in str(error.value)
    assert "S3_ACCESS_KEY_ID" in str(error.value)
    assert_no_secret(str(error.value))


def test_missing_credentials_fail_when_opening(s3_endpoint, monkeypatch, tmp_path):
    for variable in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no S3 credentials found for bucket .*S3_SECRET_ACCESS_KEY_ID"):
        open_storage(s3_endpoint.path("run"))
    monkeypatch.setenv("S3_ACCESS_KEY_ID", ACCESS_KEY_ID)
    with pytest.raises(StorageError, match="S3_SECRET_ACCESS_KEY_ID is not set"):
        open_storage(s3_endpoint.path("run"))


def test_standard_aws_variables_work_too(s3_endpoint, monkeypatch):
    monkeypatch.delenv("S3_ACCESS_KEY_ID")
    monkeypatch.delenv("S3_SECRET_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint.url)
    open_storage(f"s3://{s3_endpoint.bucket}/run").ping()


def test_repr_shows_where_but_no_secret(s3_endpoint):
    storage = open_storage(s3_endpoint.path("run"))
    assert repr(storage) == f"S3Storage(bucket='{s3_endpoint.bucket}', prefix='run', endpoint_url='{s3_endpoint.url}')"
    assert_no_secret(repr(storage) + str(storage))


def test_requests_name_the_rank_that_sent_them(s3_endpoint, monkeypatch):
    from evods import storage
    from testkit.s3_server import CountingMotoServer

    server = CountingMotoServer()  # shares the buckets of the session's server
    host, port = server.get_host_and_port()
    try:
        monkeypatch.setenv("RANK", "3")
        storage.S3Storage(s3_endpoint.bucket, "run", endpoint_url=f"http://{host}:{port}").write_bytes("a.pt", b"12345")
        monkeypatch.delenv("RANK")
        storage.S3Storage(s3_endpoint.bucket, "run", endpoint_url=f"http://{host}:{port}").read_bytes("a.pt")
        seen = [(request.rank, request.method, request.key) for request in server.requests(s3_endpoint.bucket)]
    finally:
        server.stop()
    assert seen == [(3, "PUT", "run/a.pt"), (None, "GET", "run/a.pt")]  # access logs attribute traffic to ranks
