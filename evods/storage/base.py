"""The one interface every checkpoint backend implements, and the launch-time ping built on it."""

import errno
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

# Called with the number of bytes just transferred, from any thread (boto3 reports from its transfer threads).
BytesCallback = Callable[[int], None]

_OS_ERROR_HINTS = {
    errno.EACCES: "this user lacks the permission: fix the folder's permissions or choose another folder",
    errno.EPERM: "this user lacks the permission: fix the folder's permissions or choose another folder",
    errno.ENOSPC: "the disk is full: free space there or choose a folder on a larger disk",
    errno.EDQUOT: "the disk quota is used up: free space there or choose a folder on another disk",
    errno.EROFS: "the file system is mounted read-only: choose a folder on a writable disk",
}


class StorageError(RuntimeError):
    """A storage operation failed; the message names the location and what to check. It never holds credentials."""


def is_file_system_error(exc: OSError) -> bool:
    """A permission, full-disk or read-only error: the user's to fix, not a bug."""
    return exc.errno in _OS_ERROR_HINTS


def explain_os_error(exc: OSError, action: str, path: str) -> StorageError:
    """The one-line error for an OSError of the file system (permission, full disk, read-only mount, ...): what
    failed, where, and what to do."""
    hint = _OS_ERROR_HINTS.get(exc.errno, "check that the path exists and is reachable from this machine")
    return StorageError(f"cannot {action} {exc.filename or path}: {exc.strerror or exc}; {hint}")


def clean_rel(rel: str) -> str:
    """Normalise a path relative to the storage root to 'a/b/c'; '' is the root itself.

    '..' is refused so that a relative path can never reach outside the root (a local folder or an S3 key prefix).
    """
    parts = [part for part in str(rel).replace(os.sep, "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"storage path {rel!r} contains '..'; paths are relative to the storage root, inside it")
    return "/".join(parts)


def clean_folder_to_delete(rel_dir: str) -> str:
    """The cleaned `rel_dir` for delete_prefix, which refuses the root so that one wrong argument cannot wipe it all."""
    cleaned = clean_rel(rel_dir)
    if not cleaned:
        raise ValueError("delete_prefix needs a folder below the storage root; refusing to delete the whole root")
    return cleaned


class Storage(ABC):
    """Files under one root (a local folder or an S3 bucket + key prefix), addressed by '/'-separated relative paths.

    There are only files: folders exist implicitly through the files under them (as on S3). Writes replace the whole
    file atomically, so a reader sees the old content, the new content, or no file, never a partial one; that is what
    lets a checkpoint write its `{step}.step` marker last and trust every folder that has one.
    """

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Store `data` as the file `rel`, replacing any previous one."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike, rel: str, on_bytes: BytesCallback | None = None) -> None:
        """Copy the local file to `rel` (multipart on S3 for large files); `on_bytes` hears of the progress."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The content of `rel`; FileNotFoundError when there is no such file."""

    @abstractmethod
    def download_file(self, rel: str, local_path: str | os.PathLike, on_bytes: BytesCallback | None = None) -> None:
        """Copy `rel` to the local file (replaced atomically); FileNotFoundError when there is no such file."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether a file (not a folder) is stored at `rel`."""

    @abstractmethod
    def list(self, rel_dir: str = "") -> list[str]:
        """Sorted names of the files and folders directly under `rel_dir`, like os.listdir; [] when it has none."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove the file `rel`; nothing happens when it does not exist."""

    @abstractmethod
    def delete_prefix(self, rel_dir: str) -> None:
        """Remove everything under the folder `rel_dir` (e.g. an old checkpoint); `rel_dir` must not be the root."""

    @abstractmethod
    def uri(self, rel: str = "") -> str:
        """Where `rel` lives, for messages: an absolute local path or s3://bucket/key."""

    def ping(self) -> None:
        """Write, read back and delete a small file, so that a wrong location or credentials fail at launch.

        The file is `pings/{hostname}-{pid}.ping`: the pid keeps ranks that share a host from reading each other's file.
        """
        rel = f"pings/{socket.gethostname()}-{os.getpid()}.ping"
        payload = f"evods storage ping {time.time():.6f}".encode()
        self.write_bytes(rel, payload)
        try:
            echoed = self.read_bytes(rel)
        finally:
            self.delete(rel)
        if echoed != payload:
            raise StorageError(
                f"storage check failed: {self.uri(rel)} read back {len(echoed)} bytes that differ from the "
                f"{len(payload)} bytes written; another process may be writing the same path, or the storage is faulty"
            )
