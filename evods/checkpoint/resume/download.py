"""Checkpoint files from the storage to the local disk, where DeepSpeed and torch read them: the node-local copy of
the checkpoint a run loads (`LocalCopy`: each file its ranks read downloaded once per node, checked on arrival), and
a whole folder for the converters (`fetch_folder`)."""
import logging
import os
import shutil

from evods.parallel.nodes import NodeLayout
from evods.progress import Progress
from evods.storage import LocalStorage, Storage, open_storage

from .. import collective
from ..errors import DamagedCheckpoint
from ..layout import join, walk_files
from ..marker import Manifest
from .catalogue import Catalogue
from .plan import LoadPlan
from .rank_files import assign_downloads, deepspeed_files
from .verify import problem_with

logger = logging.getLogger("evods.checkpoint")


class LocalCopy:
    """The plan's checkpoint as a local folder for the duration of a `with` block (every rank enters it together).

    On local storage that is the checkpoint folder itself. From remote storage it is a folder on the node's local
    disk (its temp folder, TMPDIR) shared by the ranks of the node: each file that some rank of the node reads
    (`reads`: this rank's, rank_files.py) is downloaded once, by one of those ranks, and checked against the step
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
        problem = problem_with(manifest, rel, path) if manifest is not None and manifest.verifiable else None
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
