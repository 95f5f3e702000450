"""Moving checkpoint files between the local disk, where DeepSpeed reads and writes, and the checkpoint storage."""
import io
import os
import shutil

import torch

from evods.storage import AsyncUploader, LocalStorage, Storage

from .layout import join, walk_files


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    # Checkpoints hold numpy RNG states and plain Python containers besides tensors.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def local_files(folder: str) -> list[str]:
    """Paths relative to `folder` of every file below it."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def fsync_tree(folder: str) -> None:
    """Make every file below `folder` durable (DeepSpeed's torch.save does not fsync)."""
    for rel in local_files(folder):
        fd = os.open(os.path.join(folder, rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Publisher:
    """Sends files to the storage: at once, or through background uploads (`uploader`) that `wait` collects."""

    def __init__(self, storage: Storage, uploader: AsyncUploader | None = None):
        self.storage = storage
        self.uploader = uploader

    def write(self, rel: str, data: bytes) -> None:
        if self.uploader is None:
            self.storage.write_bytes(rel, data)
            return
        temp = self.uploader.temp_path(os.path.basename(rel))
        with open(temp, "wb") as f:
            f.write(data)
        self.uploader.submit(temp, rel)

    def move_folder(self, local_folder: str, rel_folder: str) -> None:
        """Send every file below `local_folder` to `rel_folder`; the local folder is gone (or handed over) after."""
        for rel in local_files(local_folder):
            source = os.path.join(local_folder, rel)
            if self.uploader is None:
                self.storage.upload_file(source, join(rel_folder, rel))
            else:
                temp = self.uploader.temp_path(os.path.basename(rel))
                os.replace(source, temp)  # the staging folder lives in the uploader's temp folder: a rename
                self.uploader.submit(temp, join(rel_folder, rel))
        shutil.rmtree(local_folder, ignore_errors=True)

    def wait(self) -> None:
        if self.uploader is not None:
            self.uploader.wait()


def fetch_folder(storage: Storage, rel_folder: str, local_folder: str) -> str:
    """A local folder with the content of `rel_folder`: the folder itself for local storage, else a download."""
    if isinstance(storage, LocalStorage):
        return os.path.join(storage.root, *rel_folder.split("/"))
    for rel in walk_files(storage, rel_folder):
        storage.download_file(join(rel_folder, rel), os.path.join(local_folder, rel))
    return local_folder
