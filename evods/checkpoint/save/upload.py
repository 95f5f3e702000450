"""Sending a save's files to the checkpoint storage: at once, or through background uploads."""
import logging
import os
import shutil

from evods.progress import Progress
from evods.storage import AsyncUploader, Storage, explain_os_error

from ..layout import join
from ..marker import FileDigest, digest_bytes

logger = logging.getLogger("evods.checkpoint")


def local_files(folder: str) -> list[str]:
    """Paths relative to `folder` of every file below it."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


class Publisher:
    """Sends files to the storage: at once, or through background uploads (`uploader`) that `wait` collects."""

    def __init__(self, storage: Storage, uploader: AsyncUploader | None = None):
        self.storage = storage
        self.uploader = uploader

    def write(self, rel: str, data: bytes) -> FileDigest:
        """Store `data` as `rel`; its digest is for the step marker."""
        if self.uploader is None:
            self.storage.write_bytes(rel, data)
        else:
            temp = self.uploader.temp_path(os.path.basename(rel))
            try:
                with open(temp, "wb") as f:
                    f.write(data)
            except OSError as exc:
                raise explain_os_error(exc, "write", temp) from exc
            self.uploader.submit(temp, rel)
        return digest_bytes(data)

    def move_folder(self, local_folder: str, rel_folder: str, what: str) -> None:
        """Send every file below `local_folder` to `rel_folder`; the local folder is gone (or handed over) after."""
        files = local_files(local_folder)
        progress = Progress(f"uploading {what}", sum(os.path.getsize(os.path.join(local_folder, rel))
                                                     for rel in files), "bytes", logger)
        for rel in files:
            source = os.path.join(local_folder, rel)
            if self.uploader is None:
                self.storage.upload_file(source, join(rel_folder, rel), on_bytes=progress.advance)
            else:
                temp = self.uploader.temp_path(os.path.basename(rel))
                os.replace(source, temp)  # the staging folder lives in the uploader's temp folder: a rename
                self.uploader.submit(temp, join(rel_folder, rel))
        progress.finish()
        shutil.rmtree(local_folder, ignore_errors=True)

    def wait(self, what: str) -> None:
        if self.uploader is not None:
            self.uploader.wait(what)
