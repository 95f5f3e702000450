"""Storage in an S3 bucket (AWS or any S3-compatible server: Ceph, MinIO, OSS) through boto3."""

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from .base import BytesCallback, Storage, StorageError, clean_folder_to_delete, clean_rel, explain_os_error

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_POOL_CONNECTIONS = 100
_BOTO_ERRORS = (BotoCoreError, ClientError, S3UploadFailedError, RetriesExceededError, TransferRetriesExceededError)
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_CREDENTIALS_HINT = (
    "check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or ~/.aws)"
)
# (environment variable, default) of each bound on a request. A request that gets no answer fails after max_attempts
# x (read_timeout + the 1 s a PUT waits for "100 Continue") plus botocore's backoff between attempts (at most 1 + 2 s):
# 3 x 7 + 3 = 24 s by default, so a hung endpoint is an error within half a minute.
TIMEOUT_SETTINGS = {
    "connect_timeout": ("EVODS_S3_CONNECT_TIMEOUT", 3.0),
    "read_timeout": ("EVODS_S3_READ_TIMEOUT", 6.0),
    "max_attempts": ("EVODS_S3_MAX_ATTEMPTS", 3),
}


def timeout_setting(name: str, given: float | int | None) -> float | int:
    """`given`, else the environment variable of TIMEOUT_SETTINGS[name], else its default; a positive number."""
    variable, default = TIMEOUT_SETTINGS[name]
    if given is not None:
        return given
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = type(default)(text)
    except ValueError:
        value = 0
    if value <= 0:
        kind = "a whole number of attempts" if isinstance(default, int) else "a number of seconds"
        raise StorageError(f"{variable}={text!r}: give {kind} above 0 (default {default})")
    return value


def _env_credentials() -> dict[str, str]:
    """InternEvo's variables when set; otherwise {} and boto3 looks in its usual places (AWS_* variables, ~/.aws…)."""
    key_id, secret = os.environ.get("S3_ACCESS_KEY_ID"), os.environ.get("S3_SECRET_ACCESS_KEY_ID")
    if bool(key_id) != bool(secret):
        missing = "S3_SECRET_ACCESS_KEY_ID" if key_id else "S3_ACCESS_KEY_ID"
        raise StorageError(f"S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY_ID must be set together; {missing} is not set")
    return {"aws_access_key_id": key_id, "aws_secret_access_key": secret} if key_id else {}


def _user_agent_extra() -> str:
    """`evods-rank/N` in every request's User-Agent (N: RANK as the launcher set it), so that the storage's access
    logs tell which rank of a job sent what."""
    rank = os.environ.get("RANK", "")
    return f"evods-rank/{rank}" if rank.isdigit() else "evods"


class S3Storage(Storage):
    """Files under `s3://{bucket}/{prefix}/`.

    Every request is retried by botocore ("standard" mode: connection errors, timeouts, throttling and 5xx, with
    exponential backoff) up to `max_attempts` times; a connection attempt gives up after `connect_timeout` seconds and
    a connection that stays silent for `read_timeout` seconds is dropped, so a wrong endpoint fails within seconds
    and a hung one within half a minute (TIMEOUT_SETTINGS: a value not given comes from EVODS_S3_CONNECT_TIMEOUT,
    EVODS_S3_READ_TIMEOUT, EVODS_S3_MAX_ATTEMPTS, else the defaults 3 s, 6 s, 3). Files above `multipart_threshold`
    bytes go up in `multipart_chunksize` parts, `max_concurrency` at a time (InternEvo's defaults).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 100 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 10,
        max_attempts: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ):
        self.bucket = bucket
        self.prefix = clean_rel(prefix)
        self.endpoint_url = endpoint_url
        session = boto3.session.Session(**_env_credentials())
        credentials = session.get_credentials()
        if credentials is None:
            raise StorageError(
                f"no S3 credentials found for bucket {bucket!r} at {self._endpoint_name}: {_CREDENTIALS_HINT}"
            )
        frozen = credentials.get_frozen_credentials()
        # Kept only to scrub them from error messages, which quote text from the server.
        self._secrets = tuple(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
        self.max_attempts = timeout_setting("max_attempts", max_attempts)
        self.read_timeout = timeout_setting("read_timeout", read_timeout)
        config = Config(
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=timeout_setting("connect_timeout", connect_timeout),
            read_timeout=self.read_timeout,
            # Several transfers at once (AsyncUploader workers), each with max_concurrency part threads.
            max_pool_connections=_POOL_CONNECTIONS,
            user_agent_extra=_user_agent_extra(),
        )
        if endpoint_url:
            # S3-compatible servers want path-style URLs (no bucket.host DNS names) and often reject the CRC checksums
            # that boto3 >= 1.36 sends by default.
            config = config.merge(
                Config(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            # botocore already retries each request; s3transfer's own download retries would multiply the attempts
            # (and the time a hung endpoint takes to fail) by five.
            num_download_attempts=1,
        )
        for proxy_variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            if os.environ.get(proxy_variable):
                logger.warning(
                    "%s is set: requests to %s may go through that proxy; add the storage host to no_proxy if it "
                    "should not", proxy_variable, self._endpoint_name,
                )

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def _endpoint_name(self) -> str:
        return self.endpoint_url or "the default AWS endpoint"

    def _key(self, rel: str) -> str:
        return "/".join(part for part in (self.prefix, clean_rel(rel)) if part)

    def _folder_key(self, rel_dir: str) -> str:
        """The key prefix of everything inside `rel_dir`; the trailing '/' keeps folder '10' from matching '100'."""
        key = self._key(rel_dir)
        return key + "/" if key else ""

    def _error(self, action: str, rel: str, exc: Exception) -> Exception:
        """What to raise for a failed boto3 call: FileNotFoundError for a missing object, else a one-line StorageError
        that says what answered and what to check."""
        # upload_file wraps the ClientError that says what actually went wrong, downloads the last network error.
        cause = exc.__context__ if isinstance(exc, S3UploadFailedError) and exc.__context__ else exc
        cause = getattr(cause, "last_exception", None) or cause
        response = cause.response if isinstance(cause, ClientError) else {}
        code = response.get("Error", {}).get("Code", "")
        where = f"{self.uri(rel)} at {self._endpoint_name}"
        is_head = getattr(cause, "operation_name", "") == "HeadObject"
        if code in ("NoSuchKey", "NotFound") or (code == "404" and is_head):
            return FileNotFoundError(f"no such file: {where}")
        reason = str(cause)
        if isinstance(cause, ClientError) and not is_head and not code.isalpha():
            # An S3 server's error body names its error (NoSuchKey, NoSuchBucket, AccessDenied...); an answer without
            # one (a bare or HTML 404 or 502) came from a web server or proxy. HEAD answers have no body at all.
            reason = f"{self._endpoint_name} answered {_describe_answer(response)}, not an S3 error"
            hint = (
                f"the endpoint must be the S3 service itself (scheme, host and port, no path: "
                f"boto3:s3://BUCKET.HOST:PORT/prefix, or S3_ENDPOINT_URL for s3:// paths), and bucket {self.bucket!r} "
                "must exist there"
            )
        elif code == "NoSuchBucket":
            hint = (
                f"bucket {self.bucket!r} does not exist at {self._endpoint_name}: check the bucket name (in "
                "boto3:s3://BUCKET.endpoint/prefix it is the text before the first '.') and the endpoint"
            )
        elif code in _CREDENTIAL_CODES:
            hint = f"the storage rejected the credentials: {_CREDENTIALS_HINT}"
        elif code in ("AccessDenied", "403"):
            hint = f"access denied: check that these credentials may read and write bucket {self.bucket!r}"
        elif isinstance(cause, ReadTimeoutError):
            reason = (f"{self._endpoint_name} accepted the connection but sent no answer within "
                      f"{self.read_timeout:g} s ({self.max_attempts} attempts)")
            hint = (
                "that the endpoint is an S3 server and is up (not a hung server or proxy); on a slow storage "
                "raise EVODS_S3_READ_TIMEOUT (seconds) or EVODS_S3_MAX_ATTEMPTS"
            )
        elif isinstance(cause, (BotoConnectionError, HTTPClientError)):
            hint = (
                f"no answer from {self._endpoint_name}: check the endpoint (host and port) in the path or in "
                "S3_ENDPOINT_URL / AWS_ENDPOINT_URL, and that this machine can reach it"
            )
        else:
            hint = ""
        message = f"S3 {action} of {where} failed: {reason}" + (f"; what to check: {hint}" if hint else "")
        message = " ".join(message.split())  # one line, whatever the server put in its message
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return StorageError(message)

    @contextmanager
    def _errors_explained(self, action: str, rel: str) -> Iterator[None]:
        try:
            yield
        except _BOTO_ERRORS as exc:
            raise self._error(action, rel, exc) from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors_explained("write", rel):
            self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel), Config=self._transfer)

    def upload_file(self, local_path: str | os.PathLike, rel: str, on_bytes: BytesCallback | None = None) -> None:
        with self._errors_explained("upload", rel):
            self._client.upload_file(os.fspath(local_path), self.bucket, self._key(rel), Config=self._transfer,
                                     Callback=on_bytes)

    def read_bytes(self, rel: str) -> bytes:
        buffer = io.BytesIO()
        with self._errors_explained("read", rel):
            self._client.download_fileobj(self.bucket, self._key(rel), buffer, Config=self._transfer)
        return buffer.getvalue()

    def download_file(self, rel: str, local_path: str | os.PathLike, on_bytes: BytesCallback | None = None) -> None:
        # boto3 writes to a temp name next to local_path and renames it, so local_path is never left half-written.
        local_path = os.fspath(local_path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
            with self._errors_explained("download", rel):
                self._client.download_file(self.bucket, self._key(rel), local_path, Config=self._transfer,
                                           Callback=on_bytes)
        except FileNotFoundError:
            raise
        except OSError as exc:  # the local side: a full or read-only disk, a folder without permission
            raise explain_os_error(exc, "download to", local_path) from exc

    def exists(self, rel: str) -> bool:
        try:
            with self._errors_explained("existence check", rel):
                self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except FileNotFoundError:
            return False
        return True

    def _pages(self, action: str, rel_dir: str, **list_args) -> Iterator[dict]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors_explained(action, rel_dir):
            yield from paginator.paginate(Bucket=self.bucket, Prefix=self._folder_key(rel_dir), **list_args)

    def list(self, rel_dir: str = "") -> list[str]:
        start = len(self._folder_key(rel_dir))
        names = set()
        for page in self._pages("listing", rel_dir, Delimiter="/"):
            names.update(entry["Prefix"][start:].rstrip("/") for entry in page.get("CommonPrefixes", []))
            names.update(entry["Key"][start:] for entry in page.get("Contents", []))
        names.discard("")  # a "folder marker" object whose key is the prefix itself
        return sorted(names)

    def delete(self, rel: str) -> None:
        with self._errors_explained("delete", rel):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def delete_prefix(self, rel_dir: str) -> None:
        rel_dir = clean_folder_to_delete(rel_dir)
        # List everything first: deleting while paginating could shift the listing under the continuation token.
        keys = [entry["Key"] for page in self._pages("listing", rel_dir) for entry in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # the most one delete_objects call accepts
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._errors_explained("delete", rel_dir):
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                errors = response["Errors"]
                raise StorageError(
                    f"S3 delete under {self.uri(rel_dir)} at {self._endpoint_name} failed for {len(errors)} objects, "
                    f"e.g. {errors[0].get('Key')}: {errors[0].get('Code')} {errors[0].get('Message')}"
                )

    def uri(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"


def _describe_answer(response: dict) -> str:
    """'HTTP 404 with an empty body (server nginx)', '... with an HTML page titled "404 Not Found"' for a response
    botocore parsed from something that is not an S3 server."""
    metadata = response.get("ResponseMetadata", {})
    headers = metadata.get("HTTPHeaders", {})
    length, kind = headers.get("content-length"), headers.get("content-type", "").split(";")[0]
    title = response.get("head", {}).get("title") if isinstance(response.get("head"), dict) else None
    if length == "0":
        body = "an empty body"
    elif "html" in kind or title:
        body = f"an HTML page titled {title!r}" if title else "an HTML page"
    else:
        body = f"a {kind} body" if kind else "a body that is not S3's XML"
    server = f" (server: {headers['server']})" if headers.get("server") else ""
    return f"HTTP {metadata.get('HTTPStatusCode', '?')} with {body}{server}"
