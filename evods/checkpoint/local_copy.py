"""A checkpoint to load, as a local folder: what rank 0 learns of it for every rank (its files, marker and saved
layout), and the node-local copy into which the ranks of a node download, once each, the files they read."""
import json
import logging
import os
import shutil
from dataclasses import dataclass

from evods.parallel.nodes import NodeLayout
from evods.storage import LocalStorage, open_storage

from . import collective, layout
from .errors import DamagedCheckpoint
from .integrity import Manifest
from .selection import assign_downloads, deepspeed_files
from .sources import LoadPlan
from .transfer import download_files, make_placeholders

logger = logging.getLogger("evods.checkpoint")


@dataclass(frozen=True)
class Catalogue:
    """What rank 0 read about the checkpoint to load, for every rank: its files (with their sizes when the step
    marker lists them), the marker, and the layout it was saved at (evods checkpoints)."""

    files: dict[str, int | None]
    manifest: Manifest | None
    topology: dict | None


class LocalCopy:
    """The plan's checkpoint as a local folder for the duration of a `with` block (every rank enters it together).

    On local storage that is the checkpoint folder itself. From remote storage it is a folder on the node's local
    disk (its temp folder, TMPDIR) shared by the ranks of the node: each file that some rank of the node reads
    (`reads`: this rank's, selection.py) is downloaded once, by one of those ranks, and checked against the step
    marker on arrival. No rank downloads a file it does not read, and none the whole checkpoint unless it reads it.
    """

    def __init__(self, plan: LoadPlan, catalogue: Catalogue, reads: list[str], nodes: NodeLayout):
        self.plan = plan
        self.catalogue = catalogue
        self.reads = reads
        self.nodes = nodes
        self._folder: str | None = None

    def __enter__(self) -> str:
        storage = open_storage(self.plan.path)
        if isinstance(storage, LocalStorage):
            return os.path.join(storage.root, *self.plan.folder.split("/"))
        self._folder = folder = collective.node_scratch_folder(self.nodes, "load")
        every_rank_reads = collective.all_gather(self.reads)
        node_reads = {rank: every_rank_reads[rank] for rank in self.nodes.local_ranks}
        mine = assign_downloads(node_reads, self.catalogue.files)[collective.rank()]
        read_on_node = {rel for rels in node_reads.values() for rel in rels}

        def download():
            download_files(storage, self.plan.folder, folder, mine, self.catalogue.files, self.catalogue.manifest)
            if self.nodes.is_leader:
                make_placeholders(folder, [rel for rel in deepspeed_files(self.catalogue.files)
                                           if rel not in read_on_node])

        collective.agree_on_failure(f"downloading {self.plan.describe()}", download)
        return folder

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._folder is None:
            return
        if exc_type is None:  # the node's ranks are done reading (on an error every rank leaves together anyway)
            collective.barrier()
        if self.nodes.is_leader:
            shutil.rmtree(self._folder, ignore_errors=True)


def is_evods(plan: LoadPlan) -> bool:
    return plan.ckpt_type == "evods" and not plan.is_native


def read_catalogue_on_rank0(plan: LoadPlan) -> Catalogue:
    return collective.on_rank0(f"reading the file list of {plan.describe()}", lambda: _read_catalogue(plan))


def _read_catalogue(plan: LoadPlan) -> Catalogue:
    """The files of the planned checkpoint: from its step marker when it lists them (no listing requests), else
    from a listing of the folder; and the layout it was saved at."""
    storage = open_storage(plan.path)
    manifest = topology = None
    if is_evods(plan):
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


def verify_local(folder: str, plan: LoadPlan, catalogue: Catalogue) -> None:
    """On local storage, check this rank's share of the checkpoint's files against its marker (each rank hashes
    every world-size-th file, so the whole checkpoint is read once); DamagedCheckpoint names the first problem.
    Downloaded files were checked on arrival; checkpoints of older evods versions, whose marker lists no files, load
    unchecked."""
    manifest = catalogue.manifest
    if not isinstance(open_storage(plan.path), LocalStorage) or manifest is None or not manifest.verifiable:
        return
    share = sorted(manifest.files)[collective.rank()::collective.world_size()]
    problems = manifest.problems_in(folder, share)
    if problems:
        raise DamagedCheckpoint(problems[0])
