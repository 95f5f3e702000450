"""InternEvo's native model files (§5, §6.2) described once, as data: which HF weights each native parameter holds and
how tensor parallelism splits it. The converters and the loaders both go through `shard_weights` / `merge_shards`.

One file per (tensor rank t, pipeline stage p), `model_tp{t}_pp{p}.pt`, holds the stage's parameters with the prefix
`model.` and the decoder blocks renumbered from 0 on every stage. Stages own layer ranges by InternEvo's
`partition_uniform`: an even share each, the later stages one more when the layers do not divide evenly.
"""
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

PREFIX = "model."
# Which native MLP weight is which projection. v1: InternLM and InternEvo before its 2024-02 rename (ae5a7ee);
# v2: InternEvo after it (the LLaMA convention).
MLP_NAMINGS = {
    "v1": {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"},
    "v2": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
}


class Replicated:
    """Every tensor rank holds the whole tensor (norms)."""

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        return full[0]

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [shards[0]]


@dataclass(frozen=True)
class Chunked:
    """Rank t holds the t-th of tp equal chunks along `dim`."""

    dim: int

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        size = full[0].shape[self.dim]
        if size % tp:
            raise CheckpointError(f"a dimension of {size} does not split over {tp} tensor ranks")
        return full[0].chunk(tp, dim=self.dim)[rank]

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(shards, dim=self.dim)]


class HeadwiseQKV:
    """q, k and v fused (Wqkv): rank t holds [its q heads; its k heads; its v heads], local layout (3, H/tp, d, ...)."""

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        stacked = torch.stack(full)  # (3, H*d, ...): a chunk of H*d rows is a chunk of whole heads (H % tp == 0)
        return stacked.chunk(tp, dim=1)[rank].reshape(-1, *stacked.shape[2:])

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        merged = torch.cat([shard.reshape(3, -1, *shard.shape[1:]) for shard in shards], dim=1)
        return list(merged.unbind(0))


class FirstRankOnly:
    """Only tensor rank 0 stores it (the row-parallel out_proj bias, added once after the reduction)."""

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor | None:
        return full[0] if rank == 0 else None

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [shards[0]]


ROWS, COLUMNS = Chunked(0), Chunked(1)


@dataclass(frozen=True)
class NativeParam:
    native: str  # name without the "model." prefix; {i} is the block index local to the stage
    hf: tuple[str, ...]  # the HF weights it holds; {i} is the global layer index
    split: object


def block_params(mlp_naming: str) -> list[NativeParam]:
    if mlp_naming not in MLP_NAMINGS:
        raise CheckpointError(f"MLP naming {mlp_naming!r} is unknown; use one of {tuple(MLP_NAMINGS)}")
    attn, layer = "model.layers.{i}.self_attn", "model.layers.{i}"
    params = [
        NativeParam("blocks.{i}.norm1.weight", (f"{layer}.input_layernorm.weight",), Replicated()),
        NativeParam("blocks.{i}.norm2.weight", (f"{layer}.post_attention_layernorm.weight",), Replicated()),
        NativeParam("blocks.{i}.mixer.Wqkv.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"), HeadwiseQKV()),
        NativeParam("blocks.{i}.mixer.Wqkv.bias", tuple(f"{attn}.{x}_proj.bias" for x in "qkv"), HeadwiseQKV()),
        NativeParam("blocks.{i}.mixer.out_proj.weight", (f"{attn}.o_proj.weight",), COLUMNS),
        NativeParam("blocks.{i}.mixer.out_proj.bias", (f"{attn}.o_proj.bias",), FirstRankOnly()),
    ]
    for native, projection in MLP_NAMINGS[mlp_naming].items():
        split = COLUMNS if projection == "down_proj" else ROWS  # down is row-parallel, gate and up column-parallel
        params.append(NativeParam(f"blocks.{{i}}.mlp.{native}.weight", (f"{layer}.mlp.{projection}.weight",), split))
    return params


def embedding_param(embed_split_hidden: bool) -> NativeParam:
    if embed_split_hidden:  # Embedding1D: [vocab, hidden/tp]
        return NativeParam("embedding.weight", ("model.embed_tokens.weight",), COLUMNS)
    return NativeParam("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ROWS)  # [vocab/tp, hidden]


HEAD_PARAMS = (NativeParam("norm.weight", ("model.norm.weight",), Replicated()),
               NativeParam("head.weight", ("lm_head.weight",), ROWS))


def partition_uniform(num_layers: int, pp: int) -> list[range]:
    """Layer range of each pipeline stage: an equal share, plus one layer for each of the last `num_layers % pp`."""
    if num_layers < pp:
        raise CheckpointError(f"{num_layers} layers cannot fill {pp} pipeline stages")
    share, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = share + (stage >= pp - extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


@dataclass(frozen=True)
class NativeLayout:
    tp: int
    pp: int
    num_layers: int
    embed_split_hidden: bool = False
    mlp_naming: str = "v1"

    def stage_params(self, stage: int, layers: range) -> list[tuple[str, tuple[str, ...], object]]:
        """(native name with prefix, HF names, split) of every parameter of `stage`, which holds `layers`."""
        def resolve(param: NativeParam, local: int = 0, layer: int = 0):
            return PREFIX + param.native.format(i=local), tuple(n.format(i=layer) for n in param.hf), param.split

        params = [resolve(embedding_param(self.embed_split_hidden))] if stage == 0 else []
        params += [resolve(param, local, layer) for local, layer in enumerate(layers)
                   for param in block_params(self.mlp_naming)]
        if stage == self.pp - 1:
            params += [resolve(param) for param in HEAD_PARAMS]
        return params


def shard_weights(weights: dict[str, torch.Tensor], layout: NativeLayout) -> dict[tuple[int, int], dict]:
    """{(t, p): the state dict of model_tp{t}_pp{p}.pt} from full HF-named weights."""
    files = {}
    for stage, layers in enumerate(partition_uniform(layout.num_layers, layout.pp)):
        params = layout.stage_params(stage, layers)
        for rank in range(layout.tp):
            state = {}
            for native, hf_names, split in params:
                tensor = split.shard([weights[name] for name in hf_names], layout.tp, rank)
                if tensor is not None:
                    state[native] = tensor.clone()  # its own storage: torch.save would write the whole full tensor
            files[(rank, stage)] = state
    return files


def merge_shards(files: dict[tuple[int, int], dict], layout: NativeLayout, source: str) -> dict[str, torch.Tensor]:
    """Full HF-named weights from every model_tp{t}_pp{p}.pt state dict; stage sizes are read from the files."""
    weights, first_layer = {}, 0
    for stage in range(layout.pp):
        stage_files = [files[(rank, stage)] for rank in range(layout.tp)]
        layers = range(first_layer, first_layer + _block_count(stage_files[0]))
        first_layer = layers.stop
        params = layout.stage_params(stage, layers)
        expected = {native for native, _, _ in params}
        unexpected = sorted(set(stage_files[0]) - expected)
        if unexpected:
            raise CheckpointError(f"{source}: model_tp0_pp{stage}.pt has parameters that InternLM's layout does not "
                                  f"have: {unexpected[:4]} (interleaved pipelines, num_chunks > 1, and MoE are not "
                                  "supported)")
        for native, hf_names, split in params:
            shards = [state[native] for state in stage_files if native in state]
            if not shards:
                raise CheckpointError(f"{source}: {native} is missing from model_tp*_pp{stage}.pt")
            for name, tensor in zip(hf_names, split.merge(shards)):
                weights[name] = tensor
    _check_mlp_naming(weights, layout, source)
    if first_layer != layout.num_layers:
        raise CheckpointError(f"{source}: the stages hold {first_layer} blocks, model_config.pt says "
                              f"num_layers={layout.num_layers}")
    return weights


def _block_count(state: dict) -> int:
    blocks = {name.split(".")[2] for name in state if name.startswith(PREFIX + "blocks.")}
    return len(blocks)


def _check_mlp_naming(weights: dict[str, torch.Tensor], layout: NativeLayout, source: str) -> None:
    """gate and up are [intermediate, hidden], down the transpose: a wrong naming swaps up and down."""
    mlp = "model.layers.0.mlp"
    gate, up, down = (weights[f"{mlp}.{p}.weight"].shape for p in ("gate_proj", "up_proj", "down_proj"))
    if up != gate or down != gate[::-1]:
        other = next(naming for naming in MLP_NAMINGS if naming != layout.mlp_naming)
        raise CheckpointError(f"{source}: the MLP weights do not fit naming {layout.mlp_naming} "
                              f"({MLP_NAMINGS[layout.mlp_naming]}); it looks like naming {other} "
                              f"({MLP_NAMINGS[other]})")
