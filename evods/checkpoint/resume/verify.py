"""Checking local copies of checkpoint files against the sizes and checksums in the step marker (evods.checkpoint.
marker): one file as soon as it is downloaded, a whole folder before a converter reads it, and this rank's share of
a checkpoint on local storage before it is loaded."""
import os

from evods.storage import LocalStorage, open_storage

from .. import collective
from ..errors import DamagedCheckpoint
from ..marker import Manifest, digest_file
from .catalogue import Catalogue
from .plan import LoadPlan


def problem_with(manifest: Manifest, rel: str, path: str) -> str | None:
    """Why the local file at `path` is not the checkpoint's `rel`, or None when it is."""
    expected = manifest.files[rel]
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{rel} is missing"
    if size != expected.size:
        return f"{rel} has {size} bytes, the marker says {expected.size} (truncated or overwritten)"
    if digest_file(path, manifest.algorithm).checksum != expected.checksum:
        return f"{rel} does not match its {manifest.algorithm} checksum (its content changed after the save)"
    return None


def problems_in(manifest: Manifest, folder: str, rels: list[str]) -> list[str]:
    """The problems of the files `rels` (a subset of the marker's) in the local copy `folder`."""
    found = (problem_with(manifest, rel, os.path.join(folder, *rel.split("/"))) for rel in rels)
    return [problem for problem in found if problem]


def verify_local(folder: str, plan: LoadPlan, catalogue: Catalogue) -> None:
    """On local storage, check this rank's share of the checkpoint's files against its marker (each rank hashes
    every world-size-th file, so the whole checkpoint is read once); DamagedCheckpoint names the first problem.
    Downloaded files were checked on arrival; checkpoints of older evods versions, whose marker lists no files, load
    unchecked."""
    manifest = catalogue.manifest
    if not isinstance(open_storage(plan.path), LocalStorage) or manifest is None or not manifest.verifiable:
        return
    share = sorted(manifest.files)[collective.rank()::collective.world_size()]
    problems = problems_in(manifest, folder, share)
    if problems:
        raise DamagedCheckpoint(problems[0])
