"""Node-local scratch folders (checkpoint staging, downloads, reshard caches) that a crash cannot leave behind for
good: each name carries the pid of the process that made it, and the next run on the node deletes the folders whose
process is gone (never those of a live process: other jobs and the other ranks of this one share the disk).

    {root}/evods-{kind}-pid{pid}-{random}/
"""
import os
import re
import shutil
import tempfile

_PREFIX = "evods-"
_NAME = re.compile(r"^evods-[a-z0-9-]+?-pid(\d+)-")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def make_scratch_folder(kind: str, root: str | None = None) -> str:
    """A new empty folder in `root` (default: the temp dir, TMPDIR) named for `kind` and this process."""
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{kind}-pid{os.getpid()}-", dir=root)


def clean_scratch_leftovers(root: str | None = None) -> list[str]:
    """Delete the scratch folders in `root` whose process no longer runs; their paths, for a log line."""
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:  # no such folder yet, or not readable: nothing of ours to clean
        return []
    removed = []
    for name in names:
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))) \
                and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
