"""Checkpoint storage: local folders and S3 behind one small interface, plus background uploads. No torch here:
the checkpoint code serialises, this package moves bytes and files."""

from .async_upload import AsyncUploader, AsyncUploadError, FailedUpload, default_tmp_folder
from .base import Storage, StorageError, explain_os_error
from .local import LocalStorage
from .paths import ACCEPTED_FORMS, LocalLocation, S3Location, open_storage, parse_storage_path
from .s3 import S3Storage

__all__ = [
    "ACCEPTED_FORMS",
    "AsyncUploadError",
    "AsyncUploader",
    "FailedUpload",
    "LocalLocation",
    "LocalStorage",
    "S3Location",
    "S3Storage",
    "Storage",
    "StorageError",
    "default_tmp_folder",
    "explain_os_error",
    "open_storage",
    "parse_storage_path",
]
