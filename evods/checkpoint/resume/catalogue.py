"""What rank 0 reads about the checkpoint to load, for every rank: its files (with their sizes when the step marker
lists them), the marker, and the layout it was saved at."""
import json
import logging
from dataclasses import dataclass

from evods.storage import open_storage

from .. import collective, layout
from ..marker import Manifest
from .plan import LoadPlan

logger = logging.getLogger("evods.checkpoint")


@dataclass(frozen=True)
class Catalogue:
    files: dict[str, int | None]
    manifest: Manifest | None
    topology: dict | None  # {"dp", "pp", "tp", "zero_stage", "num_layers"} of the saving run (evods checkpoints)


def read_catalogue_on_rank0(plan: LoadPlan) -> Catalogue:
    return collective.on_rank0(f"reading the file list of {plan.describe()}", lambda: _read_catalogue(plan))


def _read_catalogue(plan: LoadPlan) -> Catalogue:
    """The files of the planned checkpoint: from its step marker when it lists them (no listing requests), else
    from a listing of the folder; and the layout it was saved at."""
    storage = open_storage(plan.path)
    manifest = topology = None
    if plan.is_evods:
        step = layout.marked_step(storage, plan.folder)
        manifest = layout.read_manifest(storage, layout.CheckpointRef(step, plan.folder))
        topology = json.loads(storage.read_bytes(layout.join(plan.folder, layout.TOPOLOGY)))
    if manifest is not None and manifest.verifiable:
        files = {rel: digest.size for rel, digest in manifest.files.items()}
    else:
        if manifest is not None:
            logger.info("%s has a marker without file checksums (an older evods wrote it): loading it unchecked",
                        plan.describe())
        files = dict.fromkeys(layout.walk_files(storage, plan.folder))
    return Catalogue(files, manifest, topology)
