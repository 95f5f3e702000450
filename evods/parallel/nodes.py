"""Which ranks share a node, and how the dp × pp × tp layout falls on the nodes.

A node, for evods, is a set of ranks that see the same local disk: the same host name and the same temp folder
(TMPDIR). That is what sharing a file through the local disk needs (a checkpoint downloaded once per node, a
reshard cache), and it needs nothing from the launcher: torchrun, the deepspeed launcher and srun all work, and so
does a cluster that gives each job step its own TMPDIR.
"""
import os
import socket
import tempfile
from dataclasses import dataclass

import torch.distributed as dist

from .layout import ParallelLayout

# Nodes listed one by one in the layout line; a larger job shows these and a count.
_NODES_SHOWN = 8


@dataclass(frozen=True)
class NodeLayout:
    rank: int
    node_of_rank: tuple[int, ...]  # node index of every global rank; nodes are numbered by their lowest rank
    names: tuple[str, ...]  # "host:temp folder" of every node

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    def ranks_on(self, node: int) -> list[int]:
        return [rank for rank, of in enumerate(self.node_of_rank) if of == node]

    @property
    def local_ranks(self) -> list[int]:
        """The global ranks on this rank's node, this one included, in order."""
        return self.ranks_on(self.node)

    @property
    def leader(self) -> int:
        """The rank that does a node's one-off work (a reshard conversion): its lowest."""
        return self.local_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def node_identity() -> str:
    return f"{socket.gethostname()}:{os.path.realpath(tempfile.gettempdir())}"


def discover_nodes() -> NodeLayout:
    """Every rank's node (a collective: every rank calls it)."""
    identity = node_identity()
    if not dist.is_initialized():
        return NodeLayout(0, (0,), (identity,))
    identities = [None] * dist.get_world_size()
    dist.all_gather_object(identities, identity)
    names = list(dict.fromkeys(identities))  # in order of first appearance, i.e. of each node's lowest rank
    return NodeLayout(dist.get_rank(), tuple(names.index(name) for name in identities), tuple(names))


def _span(values: list[int]) -> str:
    """"0-3" for a contiguous run of values, "0,2" otherwise."""
    values = sorted(set(values))
    if values == list(range(values[0], values[-1] + 1)):
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def describe_layout(nodes: NodeLayout, layout: ParallelLayout) -> str:
    """One line: each node's ranks and the data, pipeline and tensor (or isp) ranks they hold (InternEvo's layout)."""
    world = len(nodes.node_of_rank)
    parts = []
    for node in range(min(nodes.num_nodes, _NODES_SHOWN)):
        ranks = nodes.ranks_on(node)
        placed = [layout.at(rank) for rank in ranks]
        row = f"isp {_span([p.sp_rank for p in placed])}" if layout.sp > 1 else \
            f"tp {_span([p.tp_rank for p in placed])}"
        parts.append(f"node {node} = ranks {_span(ranks)} (dp {_span([p.dp_rank for p in placed])}, "
                     f"pp {_span([p.pp_rank for p in placed])}, {row})")
    if nodes.num_nodes > _NODES_SHOWN:
        parts.append(f"and {nodes.num_nodes - _NODES_SHOWN} more nodes")
    return f"{nodes.num_nodes} nodes, {world} ranks: " + "; ".join(parts)


def tensor_groups_across_nodes(nodes: NodeLayout, tp: int) -> list[list[int]]:
    """The tensor-parallel groups (consecutive ranks) whose ranks are not all on one node."""
    world = len(nodes.node_of_rank)
    groups = [list(range(start, start + tp)) for start in range(0, world, tp)]
    return [group for group in groups if len({nodes.node_of_rank[rank] for rank in group}) > 1]
