"""Storage in a local (or network-mounted) folder, with atomic writes."""

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from .base import Storage, clean_folder_to_delete, clean_rel

# Temp files live next to their target (same file system, so the rename is atomic) and are hidden from list().
_TMP_SUFFIX = ".evods-partial"


def atomic_write(path: str | os.PathLike, fill: Callable[[BinaryIO], None]) -> None:
    """Create `path` through a temp file in the same folder: fill, fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one under `path`, never a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    for attempt in range(3):
        os.makedirs(folder, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=_TMP_SUFFIX)
            break
        except FileNotFoundError:  # another process removed the folder as it emptied (e.g. ranks pinging at once)
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # Make the rename itself durable; some file systems (and all of Windows) cannot open a folder, which is harmless.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with open(src, "rb") as source:
        atomic_write(dst, lambda target: shutil.copyfileobj(source, target, 1 << 20))


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.path.expanduser(root))

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _path(self, rel: str) -> str:
        cleaned = clean_rel(rel)
        return os.path.join(self.root, *cleaned.split("/")) if cleaned else self.root

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write(self._path(rel), lambda f: f.write(data))

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        copy_file_atomic(local_path, self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with open(self._path(rel), "rb") as f:
            return f.read()

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        copy_file_atomic(self._path(rel), local_path)

    def exists(self, rel: str) -> bool:
        return os.path.isfile(self._path(rel))

    def list(self, rel_dir: str = "") -> list[str]:
        folder = self._path(rel_dir)
        if not os.path.isdir(folder):
            return []
        return sorted(name for name in os.listdir(folder) if not name.endswith(_TMP_SUFFIX))

    def _remove_empty_parents(self, path: str) -> None:
        """Folders exist only through their files, as on S3: drop the ones a deletion left empty, up to the root."""
        folder = os.path.dirname(path)
        while folder != self.root and folder.startswith(self.root):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or already gone): the folders above are needed too
                return
            folder = os.path.dirname(folder)

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        self._remove_empty_parents(path)

    def delete_prefix(self, rel_dir: str) -> None:
        path = self._path(clean_folder_to_delete(rel_dir))
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        self._remove_empty_parents(path)

    def uri(self, rel: str = "") -> str:
        return self._path(rel)
