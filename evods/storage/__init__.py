"""Checkpoint storage: local folders and S3 behind one small interface, plus background uploads. No torch here:
the checkpoint code serialises, this package moves bytes and files."""

from .async_upload import AsyncUploader, AsyncUploadError, FailedUpload, default_tmp_folder
from .base import Storage, StorageError, explain_os_error
from .local import LocalStorage
from .paths import ACCEPTED_FORMS, LocalLocation, S3Location, open_storage, parse_storage_path
from .s3 import S3Storage
from .scratch import clean_scratch_leftovers, make_scratch_folder

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
    "clean_scratch_leftovers",
    "default_tmp_folder",
    "explain_os_error",
    "make_scratch_folder",
    "open_storage",
    "parse_storage_path",
]
