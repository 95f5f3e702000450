"""Moving checkpoint files between the local disk, where DeepSpeed reads and writes, and the checkpoint storage."""
import io
import logging
import os
import shutil

import torch

from evods.progress import Progress
from evods.storage import AsyncUploader, LocalStorage, Storage, explain_os_error

from . import safe_load
from .errors import DamagedCheckpoint
from .integrity import FileDigest, Manifest, digest_bytes
from .layout import join, walk_files

logger = logging.getLogger("evods.checkpoint")


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, name: str):
    """A run-state file written by to_bytes: plain containers, tensors and the numpy arrays of RNG states, read
    weights-only (safe_load.py)."""
    return safe_load.load_bytes(data, name, safe_load.NUMPY_ARRAYS)


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


def fetch_folder(storage: Storage, rel_folder: str, local_folder: str) -> str:
    """A local folder with the content of `rel_folder`: the folder itself for local storage, else a download."""
    if isinstance(storage, LocalStorage):
        return os.path.join(storage.root, *rel_folder.split("/"))
    progress = Progress(f"downloading {storage.uri(rel_folder)}", None, "bytes", logger)
    for rel in walk_files(storage, rel_folder):
        storage.download_file(join(rel_folder, rel), os.path.join(local_folder, rel), on_bytes=progress.advance)
    progress.finish()
    return local_folder


def download_files(storage: Storage, rel_folder: str, local_folder: str, rels: list[str], sizes: dict[str, int | None],
                   manifest: Manifest | None) -> None:
    """Download the files `rels` of `rel_folder` into `local_folder`, each checked against the step marker's
    `manifest` as soon as it is there (DamagedCheckpoint names the first that does not match)."""
    progress = Progress(f"downloading {len(rels)} files of {storage.uri(rel_folder)}",
                        sum(sizes.get(rel) or 0 for rel in rels) or None, "bytes", logger)
    for rel in rels:
        path = os.path.join(local_folder, *rel.split("/"))
        storage.download_file(join(rel_folder, rel), path, on_bytes=progress.advance)
        problem = manifest.problem_with(rel, path) if manifest is not None and manifest.verifiable else None
        if problem:
            raise DamagedCheckpoint(problem)
    progress.finish()


def make_placeholders(local_folder: str, rels: list[str]) -> None:
    """Empty files for the DeepSpeed files this node does not download. DeepSpeed finds a checkpoint's model files
    with glob and picks the rank's own by its position in that list (engine._get_all_ckpt_names, PipelineModule.
    ckpt_layer_path_list), so every name must exist; it reads only its own, and evods' checkpoint engine refuses
    to load an empty file (deepspeed_io.py)."""
    for rel in rels:
        path = os.path.join(local_folder, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
