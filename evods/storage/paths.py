"""Storage paths as written in configs (`save_ckpt_folder`, `load_ckpt_info.path`…) and opening them."""

import os
import re
from dataclasses import dataclass

from .base import Storage, StorageError, clean_rel
from .local import LocalStorage
from .s3 import S3Storage

ACCEPTED_FORMS = (
    "local:/path/to/folder, /path/to/folder (no scheme is local), "
    "boto3:s3://BUCKET.ENDPOINT/prefix (InternEvo's form; ENDPOINT is an IP or host, with an optional :port, "
    "port 80 when absent), s3://BUCKET/prefix (endpoint from S3_ENDPOINT_URL / AWS_ENDPOINT_URL or the "
    "endpoint_url option, else AWS)"
)
# Only a word before the first ':' is a scheme, so that a local path such as /data/run:1 stays a local path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)


class StoragePathError(StorageError, ValueError):
    """A storage path in none of the accepted forms (a ValueError too, as for any malformed argument)."""


@dataclass(frozen=True)
class LocalLocation:
    root: str


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint_url: str | None


def _split_s3_url(url: str, original: str) -> tuple[str, str]:
    """'s3://first/rest/of/path' -> ('first', 'rest/of/path'). removeprefix, not InternEvo's lstrip("s3://"), which
    also ate the leading 's' and '3' characters of bucket names."""
    if not url.startswith("s3://"):
        raise StoragePathError(
            f"storage path {original!r}: expected s3://… after boto3:; accepted forms: {ACCEPTED_FORMS}")
    first, _, rest = url.removeprefix("s3://").partition("/")
    return first, clean_rel(rest)


def _endpoint_from_env() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def parse_storage_path(path: str, endpoint_url: str | None = None) -> LocalLocation | S3Location:
    """Where a storage path points, without connecting to anything.

    `endpoint_url` (e.g. from the config) is for s3://bucket/prefix paths and wins over the environment; a
    boto3:s3://bucket.endpoint/ path names its endpoint itself, so giving another one there is an error.
    """
    match = _SCHEME.match(path)
    scheme, rest = (match.group(1).lower(), match.group(2)) if match else ("", path)
    if scheme in ("", "local"):
        if not rest:
            raise StoragePathError(f"storage path {path!r} names no folder; accepted forms: {ACCEPTED_FORMS}")
        return LocalLocation(os.path.abspath(os.path.expanduser(rest)))
    if scheme == "boto3":
        first, prefix = _split_s3_url(rest, path)
        bucket, _, endpoint = first.partition(".")
        if not bucket or not endpoint:
            raise StoragePathError(
                f"storage path {path!r}: boto3:s3:// paths need BUCKET.ENDPOINT before the first '/', e.g. "
                "boto3:s3://model_weights.10.1.2.3/internlm; for an endpoint from the environment use "
                "s3://BUCKET/prefix"
            )
        if endpoint_url:
            raise StoragePathError(f"storage path {path!r} already names its endpoint; do not also pass endpoint_url")
        host, port = endpoint.rsplit(":", 1) if ":" in endpoint else (endpoint, "80")
        if not host or not port.isdigit():
            raise StoragePathError(f"storage path {path!r}: endpoint {endpoint!r} is not HOST or HOST:PORT")
        return S3Location(bucket, prefix, f"http://{host}:{port}")
    if scheme == "s3":
        bucket, prefix = _split_s3_url(path, path)
        if not bucket:
            raise StoragePathError(f"storage path {path!r} names no bucket; accepted forms: {ACCEPTED_FORMS}")
        return S3Location(bucket, prefix, endpoint_url or _endpoint_from_env())
    raise StoragePathError(f"storage path {path!r}: unknown scheme {scheme!r}; accepted forms: {ACCEPTED_FORMS}")


def open_storage(path: str, **s3_options) -> Storage:
    """The Storage for a path (see ACCEPTED_FORMS). `s3_options` are S3Storage's keyword arguments (endpoint_url,
    multipart_threshold, multipart_chunksize, max_concurrency, max_attempts, connect_timeout, read_timeout); they are
    ignored for local paths, so one config serves both kinds."""
    location = parse_storage_path(path, s3_options.pop("endpoint_url", None))
    if isinstance(location, LocalLocation):
        return LocalStorage(location.root)
    return S3Storage(location.bucket, location.prefix, endpoint_url=location.endpoint_url, **s3_options)
