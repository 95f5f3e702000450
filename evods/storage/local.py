"""Storage in a local (or network-mounted) folder, with atomic writes."""

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from .base import BytesCallback, Storage, clean_folder_to_delete, clean_rel, explain_os_error

# Temp files live next to their target (same file system, so the rename is atomic) and are hidden from list().
_TMP_SUFFIX = ".evods-partial"
DEFAULT_FILE_MODE = 0o666  # what open() asks for; the umask takes its bits away (0644 under 022)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, fill: Callable[[BinaryIO], None]) -> None:
    """Create `path` through a temp file in the same folder: fill, fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one under `path`, never a partial file. The file gets
    the mode any new file gets (0644 under the usual umask 022), not mkstemp's 0600, so teammates and serving
    processes can read checkpoints.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    for attempt in range(10):
        # Another process may remove the folder as it empties it (e.g. ranks pinging at once): between makedirs'
        # mkdir and its check (FileExistsError), or before the open (FileNotFoundError). Both mean: make it again.
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DEFAULT_FILE_MODE)  # the umask applies
            break
        except (FileNotFoundError, FileExistsError):
            if attempt == 9:
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


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike, on_bytes: BytesCallback | None = None) -> None:
    def copy(target: BinaryIO) -> None:
        while chunk := source.read(1 << 20):
            target.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))

    with open(src, "rb") as source:
        atomic_write(dst, copy)


@contextmanager
def _explained(action: str, path: str) -> Iterator[None]:
    """OSErrors of the file system (other than a missing file, which callers handle) as one-line StorageErrors."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise explain_os_error(exc, action, path) from exc


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.path.expanduser(root))

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _path(self, rel: str) -> str:
        cleaned = clean_rel(rel)
        return os.path.join(self.root, *cleaned.split("/")) if cleaned else self.root

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        with _explained("write", path):
            atomic_write(path, lambda f: f.write(data))

    def upload_file(self, local_path: str | os.PathLike, rel: str, on_bytes: BytesCallback | None = None) -> None:
        path = self._path(rel)
        with _explained("write", path):
            copy_file_atomic(local_path, path, on_bytes)

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        with _explained("read", path), open(path, "rb") as f:
            return f.read()

    def download_file(self, rel: str, local_path: str | os.PathLike, on_bytes: BytesCallback | None = None) -> None:
        with _explained("copy to", os.fspath(local_path)):
            copy_file_atomic(self._path(rel), local_path, on_bytes)

    def exists(self, rel: str) -> bool:
        return os.path.isfile(self._path(rel))

    def list(self, rel_dir: str = "") -> list[str]:
        folder = self._path(rel_dir)
        if not os.path.isdir(folder):
            return []
        with _explained("list", folder):
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
            with _explained("delete", path):
                os.remove(path)
        except FileNotFoundError:
            return
        self._remove_empty_parents(path)

    def delete_prefix(self, rel_dir: str) -> None:
        path = self._path(clean_folder_to_delete(rel_dir))
        try:
            with _explained("delete", path):
                shutil.rmtree(path)
        except FileNotFoundError:
            return
        self._remove_empty_parents(path)

    def uri(self, rel: str = "") -> str:
        return self._path(rel)
