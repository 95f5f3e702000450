"""The checkpoints of one training run, as the loop sees them: `loader` (resume/) at start, `saver` (save/) after
every step."""
import logging
import os
import tempfile
from collections.abc import Callable

from evods.config import CkptConfig
from evods.parallel import ParallelLayout
from evods.parallel.nodes import NodeLayout, discover_nodes
from evods.storage import clean_scratch_leftovers

from .resume.loader import CheckpointLoader
from .save.saver import CheckpointSaver

logger = logging.getLogger("evods.checkpoint")


class CheckpointManager:
    def __init__(self, ckpt: CkptConfig, parallel: ParallelLayout, model_config, config_text: str | None,
                 upload_options: dict | None = None,
                 on_failure: Callable[[BaseException | str], None] | None = None, nodes: NodeLayout | None = None,
                 adapter_config: dict | None = None):
        """`model_config`: the model's HF config (saved as config.json, and checked against the checkpoint to load).
        `upload_options`, `on_failure`: see CheckpointSaver. `nodes`: which ranks share a node (discovered if not
        given). `adapter_config`: a LoRA run's peft adapter config, saved beside its adapters."""
        nodes = nodes or discover_nodes()
        self.saver = CheckpointSaver(ckpt, parallel, model_config, config_text, upload_options, on_failure,
                                     adapter_config)
        _clean_leftovers(nodes, self.saver.staging_root)
        self.loader = CheckpointLoader(ckpt, self.saver.storage, parallel, model_config, nodes)


def _clean_leftovers(nodes: NodeLayout, staging_root: str | None) -> None:
    """Delete the scratch folders (checkpoint staging, downloads, reshard caches) that crashed runs left on this
    node's disk: the node's leader does it before anything of this run is written there."""
    if not nodes.is_leader:
        return
    for root in dict.fromkeys((tempfile.gettempdir(), staging_root or tempfile.gettempdir())):
        removed = clean_scratch_leftovers(root)
        if removed:
            logger.warning("removed %d folders that crashed runs left in %s (e.g. %s)", len(removed), root,
                           os.path.basename(removed[0]))
