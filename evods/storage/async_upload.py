"""Upload checkpoint files in background threads while training goes on."""

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass

from evods.progress import Progress

from .base import Storage, StorageError, explain_os_error
from .scratch import process_alive

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmpfile"
# A file whose upload failed is renamed to this suffix, so that the start-up clean-up of a later run never deletes it.
KEPT_SUFFIX = ".not-uploaded"
_GiB = 1024**3


def default_tmp_folder() -> str:
    """RAM-backed /dev/shm when the machine has it (fast, and checkpoints are short-lived there), else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, "evods_tmp_ckpt")


def _writer_pid(name: str) -> int | None:
    """The pid in a temp file name made by AsyncUploader.temp_path ('{name}.{pid}.{token}.tmpfile'), else None."""
    if not name.endswith(TMP_SUFFIX):
        return None
    parts = name.removesuffix(TMP_SUFFIX).rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass(frozen=True)
class FailedUpload:
    local_path: str  # where the data is kept
    uri: str
    attempts: int
    reason: str

    def __str__(self) -> str:
        return (f"{self.uri}: failed after {self.attempts} attempts ({self.reason}); the data is kept at "
                f"{self.local_path}")


class AsyncUploadError(StorageError):
    """Some background uploads failed after their retries; their data is still on local disk (see `failures`)."""

    def __init__(self, failures: list[FailedUpload], submitted: int):
        self.failures = failures
        lines = [f"  {failure}" for failure in failures]
        super().__init__(
            f"{len(failures)} of {submitted} background checkpoint uploads failed:\n" + "\n".join(lines) + "\n"
            "Copy the kept files to their destination by hand (this checkpoint is incomplete without them), or "
            "fix the storage and resume from the previous complete checkpoint."
        )


class AsyncUploader:
    """Background uploads of local files (written to `tmp_folder`, see temp_path) to `storage`.

    submit() returns at once; wait() blocks until everything submitted so far is uploaded and raises AsyncUploadError
    naming the failures. A successful upload deletes its local file; a failed one (after `attempts` tries with doubling
    pauses from `retry_backoff_s`) keeps it. Use as a context manager, or call close(), to wait at exit.
    Thread-safe; at most `workers` uploads run at once.

    At start it deletes temp files left in `tmp_folder` by processes that no longer run (never files of live ones:
    ranks on one host share the folder), and checks that at least `min_free_gib` GiB are free there.

    `on_failure(failed)` runs in the upload thread as soon as an upload has failed for good, long before wait()
    reports it: a training run can raise an alert while it goes on.
    """

    def __init__(
        self,
        storage: Storage,
        tmp_folder: str | os.PathLike | None = None,
        *,
        workers: int = 8,
        attempts: int = 3,
        retry_backoff_s: float = 2.0,
        min_free_gib: float = 0.1,
        on_failure: Callable[[FailedUpload], None] | None = None,
    ):
        if workers < 1 or attempts < 1:
            raise ValueError(f"AsyncUploader needs workers >= 1 and attempts >= 1, got {workers} and {attempts}")
        self.storage = storage
        self.tmp_folder = os.path.abspath(tmp_folder or default_tmp_folder())
        self.attempts = attempts
        self.retry_backoff_s = retry_backoff_s
        self.on_failure = on_failure
        try:
            os.makedirs(self.tmp_folder, exist_ok=True)
        except OSError as exc:
            raise explain_os_error(exc, "create the async upload temp folder", self.tmp_folder) from exc
        self._clean_leftovers()
        free_gib = shutil.disk_usage(self.tmp_folder).free / _GiB
        if free_gib < min_free_gib:
            raise StorageError(
                f"only {free_gib:.2f} GiB free in {self.tmp_folder}, the async upload temp folder (at least "
                f"{min_free_gib} GiB needed): free some space or set async_upload_tmp_folder to a larger disk"
            )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evods-upload")
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._closed = False
        self._submitted_bytes = 0  # of the uploads since the last wait(), for its progress line
        self._uploaded_bytes = 0

    def __repr__(self) -> str:
        return f"AsyncUploader({self.storage!r}, tmp_folder={self.tmp_folder!r}, pending={self.pending})"

    def _clean_leftovers(self) -> None:
        kept = []
        for name in os.listdir(self.tmp_folder):
            pid = _writer_pid(name)
            if pid is not None and not process_alive(pid):
                os.remove(os.path.join(self.tmp_folder, name))
            elif name.endswith(KEPT_SUFFIX):
                kept.append(name)
        if kept:
            logger.warning(
                "%d files in %s are from earlier uploads that failed (e.g. %s): copy them to their checkpoint folder "
                "or delete them", len(kept), self.tmp_folder, kept[0],
            )

    def temp_path(self, name: str) -> str:
        """A fresh path in the temp folder to write the file `name` to before submitting it."""
        return os.path.join(self.tmp_folder, f"{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")

    def submit(self, local_path: str | os.PathLike, rel: str) -> None:
        """Upload the file to `rel` in the background. The file is handed over: it is deleted once uploaded."""
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise FileNotFoundError(f"cannot upload {local_path} to {self.storage.uri(rel)}: no such file")
        size = os.path.getsize(local_path)
        with self._lock:
            if not self._closed:
                self._submitted_bytes += size
                self._futures.append(self._executor.submit(self._upload, local_path, rel))
                return
        raise RuntimeError(f"{self!r} is closed; cannot upload {local_path}")

    @property
    def pending(self) -> int:
        """How many submitted uploads have not finished yet."""
        with self._lock:
            return sum(not future.done() for future in self._futures)

    def _upload(self, local_path: str, rel: str) -> FailedUpload | None:
        for attempt in range(1, self.attempts + 1):
            try:
                self.storage.upload_file(local_path, rel, on_bytes=self._count_uploaded)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then reported by wait()
                reason = f"{type(exc).__name__}: {exc}"
                if attempt < self.attempts:
                    pause = self.retry_backoff_s * 2 ** (attempt - 1)
                    logger.warning(
                        "upload of %s to %s failed (attempt %d of %d), retrying in %.1f s: %s",
                        local_path, self.storage.uri(rel), attempt, self.attempts, pause, reason,
                    )
                    time.sleep(pause)
            else:
                os.remove(local_path)
                return None
        kept = local_path.removesuffix(TMP_SUFFIX) + KEPT_SUFFIX if local_path.endswith(TMP_SUFFIX) else local_path
        os.replace(local_path, kept)
        failed = FailedUpload(kept, self.storage.uri(rel), self.attempts, reason)
        if self.on_failure is not None:
            try:
                self.on_failure(failed)
            except Exception:  # noqa: BLE001 - the failure itself is still reported by wait()
                logger.exception("the upload failure callback failed")
        return failed

    def _count_uploaded(self, amount: int) -> None:
        with self._lock:
            self._uploaded_bytes += amount

    def wait(self, what: str = "background uploads") -> None:
        """Block until every upload submitted before this call has finished; raise AsyncUploadError if any failed.
        A wait of more than a few seconds logs progress lines naming `what`."""
        with self._lock:
            futures, self._futures = self._futures, []
            total = self._submitted_bytes
        progress = Progress(f"uploading {what}", total, "bytes", logger)
        remaining = set(futures)
        while remaining:
            _, remaining = wait_for_futures(remaining, timeout=1.0, return_when=FIRST_COMPLETED)
            progress.advance_to(min(self._uploaded_bytes, total))
        progress.finish()
        with self._lock:
            self._submitted_bytes = self._uploaded_bytes = 0
        failures = [failure for failure in (future.result() for future in futures) if failure is not None]
        if failures:
            raise AsyncUploadError(failures, len(futures))

    def close(self) -> None:
        """Wait for the pending uploads (raising like wait()) and stop the worker threads."""
        with self._lock:
            self._closed = True
        try:
            self.wait()
        finally:
            self._executor.shutdown()

    def __enter__(self) -> "AsyncUploader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
