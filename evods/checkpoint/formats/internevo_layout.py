"""InternEvo's native model files described once, as data: which HF weights each native parameter holds and how
tensor parallelism splits it. The converters and the loaders both go through `shard_weights` / `merge_shards`.

One file per (tensor rank t, pipeline stage p), `model_tp{t}_pp{p}.pt`, holds the stage's parameters with the decoder
blocks renumbered from 0 on every stage. Stages own layer ranges by InternEvo's `partition_uniform`: an even share
each, the later stages one more when the layers do not divide evenly. Three families of names:
- "internlm": InternLM's model (`embedding`, `blocks.{i}.mixer.Wqkv`, `head`), q/k/v fused per tensor rank;
- "llama": InternEvo's LLaMA-family models (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`,
  `output`), as `revert_internlm.py` writes them and `load_ckpt_info(..., ckpt_type="llama")` loads them; InternLM3
  (InternEvo's InternLM2 class with `enable_qkv_fusion=False`) saves these names too;
- "internlm2": InternLM2's, the llama names with q/k/v fused into one `layers.{i}.attention.wqkv` whose rows are
  grouped by KV head (`GroupedQKV`).
Under grouped-query attention a tensor rank holds the KV heads its query heads use (evods.model.HeadSplit): whole KV
heads when the tensor size divides them, else a copy of its one KV head, which the ranks sharing it all store.
InternEvo saved through its NaiveAMP wrapper, which prefixes every name with `model.`, until its checkpoint manager
unwrapped the model (2024-03); files of both kinds are read, and evods writes the InternLM family with the prefix.
"""
import re
from dataclasses import dataclass

import torch

from evods.model import HeadSplit

from ..errors import CheckpointError

PREFIX = "model."
FAMILIES = ("internlm", "llama", "internlm2")
# how load_ckpt_info names each family
FAMILY_CKPT_TYPES = {"internlm": "ckpt_type='internlm' (or 'internevo' after its 2024-02 MLP rename)",
                     "llama": "ckpt_type='llama' (or 'internevo')",
                     "internlm2": "ckpt_type='internevo' (or 'internlm2_test')"}
LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")
BLOCK_INDEX = {"internlm": re.compile(r"^blocks\.(\d+)\."), "llama": LAYER_INDEX, "internlm2": LAYER_INDEX}
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


def interleave_rotary_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k rows (heads * head_dim, ...) from HF's rotate-half order, where each head's two halves lie apart, to the
    interleaved order (x0, x_{d/2}, x1, x_{d/2+1}, ...) of Meta's LLaMA and of InternEvo's `qk_interleaved=True`
    (InternEvo's convert2hf_internlm2.py `permute` is the inverse, `halve_rotary_rows`)."""
    return rows.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def halve_rotary_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `interleave_rotary_rows`: each head's even rows, then its odd rows."""
    return rows.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


@dataclass(frozen=True)
class AttentionHeads:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def split(self, tp: int) -> HeadSplit:
        try:
            return HeadSplit(self.num_heads, self.num_kv_heads, tp)
        except ValueError as error:
            raise CheckpointError(f"tensor size {tp}: {error}") from None


@dataclass(frozen=True)
class KVHeadRows:
    """k or v rows (kv_heads * head_dim, ...) split by KV head: rank t holds the KV heads its query heads use, so the
    ranks sharing one KV head each store a copy; merging takes each KV head once."""

    heads: AttentionHeads

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        kv = self.heads.split(tp).kv_heads(rank)
        return full[0].unflatten(0, (-1, self.heads.head_dim))[kv.start:kv.stop].flatten(0, 1)

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(shards[::self.heads.split(len(shards)).kv_replicas])]


@dataclass(frozen=True)
class InterleavedRotary:
    """q or k stored with interleaved rotary pairs (InternEvo's LLaMA without `adapt_hf`, its InternLM2 with
    `qk_interleaved=True`). The rows are reordered within each head, so splitting by whole heads (`split`) is
    unaffected."""

    split: object
    head_dim: int

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        return self.split.shard([interleave_rotary_rows(full[0], self.head_dim)], tp, rank)

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [halve_rotary_rows(self.split.merge(shards)[0], self.head_dim)]


@dataclass(frozen=True)
class GroupedQKV:
    """InternLM2's fused wqkv (InternEvo's GQA module, `rearrange(qkv, "(h gs d) ..." , gs=q_per_kv + 2)`): its rows
    are grouped by KV head, (kv_heads, q_per_kv + 2, head_dim), each group holding its query heads, then its key head,
    then its value head. Tensor rank t holds whole groups when the tensor size divides the KV heads, else its share of
    one group's query heads followed by a copy of the group's k and v (InternEvo's
    `load_internlm2_with_dynamic_parallel_size` splits the same way)."""

    heads: AttentionHeads
    interleaved: bool = False  # q and k rows with interleaved rotary pairs (qk_interleaved=True)

    def groups(self, tp: int, rank: int) -> list[tuple[range, int]]:
        """(its query heads, the KV head) of each group rank `rank` holds, in row order."""
        heads, q_per_kv = self.heads, self.heads.num_heads // self.heads.num_kv_heads
        per_rank = heads.num_heads // tp
        first = rank * per_rank
        return [(range(max(first, g * q_per_kv), min(first + per_rank, (g + 1) * q_per_kv)), g)
                for g in heads.split(tp).kv_heads(rank)]

    def shard(self, full: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
        q, k, v = full
        if self.interleaved:
            q, k = (interleave_rotary_rows(x, self.heads.head_dim) for x in (q, k))
        q, k, v = (x.unflatten(0, (-1, self.heads.head_dim)) for x in (q, k, v))
        rows = [part for q_heads, g in self.groups(tp, rank)
                for part in (q[q_heads.start:q_heads.stop], k[g:g + 1], v[g:g + 1])]
        return torch.cat(rows).flatten(0, 1)

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        tp, head_dim = len(shards), self.heads.head_dim
        q, k, v = [None] * self.heads.num_heads, [None] * self.heads.num_kv_heads, [None] * self.heads.num_kv_heads
        for rank, shard in enumerate(shards):
            groups = self.groups(tp, rank)
            expected = sum(len(q_heads) + 2 for q_heads, _ in groups) * head_dim
            if shard.shape[0] != expected:
                raise CheckpointError(f"tensor rank {rank}'s wqkv has {shard.shape[0]} rows; {self.heads.num_heads} "
                                      f"query and {self.heads.num_kv_heads} KV heads of {head_dim} over {tp} ranks "
                                      f"give {expected}: model_config.pt does not describe this checkpoint")
            local, row = shard.unflatten(0, (-1, head_dim)), 0
            for q_heads, g in groups:
                q[q_heads.start:q_heads.stop] = local[row:row + len(q_heads)]
                k[g], v[g] = local[row + len(q_heads)], local[row + len(q_heads) + 1]  # a shared copy: the first
                row += len(q_heads) + 2
        q, k, v = (torch.stack(x).flatten(0, 1) for x in (q, k, v))
        if self.interleaved:
            q, k = (halve_rotary_rows(x, head_dim) for x in (q, k))
        return [q, k, v]


ROWS, COLUMNS = Chunked(0), Chunked(1)


@dataclass(frozen=True)
class NativeParam:
    native: str  # name without the "model." prefix; {i} is the block index local to the stage
    hf: tuple[str, ...]  # the HF weights it holds; {i} is the global layer index
    split: object


def mlp_params(prefix: str, mlp_naming: str) -> list[NativeParam]:
    if mlp_naming not in MLP_NAMINGS:
        raise CheckpointError(f"MLP naming {mlp_naming!r} is unknown; use one of {tuple(MLP_NAMINGS)}")
    split = {"gate_proj": ROWS, "up_proj": ROWS, "down_proj": COLUMNS}  # down is row-parallel, gate and up columns
    return [NativeParam(f"{prefix}.{native}.weight", (f"model.layers.{{i}}.mlp.{proj}.weight",), split[proj])
            for native, proj in MLP_NAMINGS[mlp_naming].items()]


def internlm_block_params(layout: "NativeLayout") -> list[NativeParam]:
    attn, layer = "model.layers.{i}.self_attn", "model.layers.{i}"
    params = [
        NativeParam("blocks.{i}.norm1.weight", (f"{layer}.input_layernorm.weight",), Replicated()),
        NativeParam("blocks.{i}.norm2.weight", (f"{layer}.post_attention_layernorm.weight",), Replicated()),
        NativeParam("blocks.{i}.mixer.Wqkv.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"), HeadwiseQKV()),
        NativeParam("blocks.{i}.mixer.out_proj.weight", (f"{attn}.o_proj.weight",), COLUMNS),
    ]
    if layout.bias:
        params += [
            NativeParam("blocks.{i}.mixer.Wqkv.bias", tuple(f"{attn}.{x}_proj.bias" for x in "qkv"), HeadwiseQKV()),
            NativeParam("blocks.{i}.mixer.out_proj.bias", (f"{attn}.o_proj.bias",), FirstRankOnly()),
        ]
    return params + mlp_params("blocks.{i}.mlp", layout.mlp_naming)


def llama_block_params(layout: "NativeLayout") -> list[NativeParam]:
    """Split q/k/v (the llama family) or one grouped wqkv (internlm2), with the same names around them."""
    attn, layer = "model.layers.{i}.self_attn", "model.layers.{i}"
    kinds = ("weight", "bias") if layout.bias else ("weight",)
    if layout.family == "internlm2":
        grouped = GroupedQKV(layout.heads, layout.qk_interleaved)
        qkv = [NativeParam(f"layers.{{i}}.attention.wqkv.{kind}", tuple(f"{attn}.{x}_proj.{kind}" for x in "qkv"),
                           grouped) for kind in kinds]
    else:
        kv = ROWS if layout.heads is None else KVHeadRows(layout.heads)
        splits = {"q": ROWS, "k": kv, "v": kv}
        if layout.qk_interleaved:
            head_dim = layout.heads.head_dim
            splits.update(q=InterleavedRotary(ROWS, head_dim), k=InterleavedRotary(kv, head_dim))
        qkv = [NativeParam(f"layers.{{i}}.attention.w{x}.{kind}", (f"{attn}.{x}_proj.{kind}",), splits[x])
               for kind in kinds for x in "qkv"]
    params = [
        NativeParam("layers.{i}.attention_norm.weight", (f"{layer}.input_layernorm.weight",), Replicated()),
        NativeParam("layers.{i}.ffn_norm.weight", (f"{layer}.post_attention_layernorm.weight",), Replicated()),
        *qkv,
        NativeParam("layers.{i}.attention.wo.weight", (f"{attn}.o_proj.weight",), COLUMNS),
    ]
    if layout.bias:
        params.append(NativeParam("layers.{i}.attention.wo.bias", (f"{attn}.o_proj.bias",), FirstRankOnly()))
    return params + mlp_params("layers.{i}.feed_forward", layout.mlp_naming)


def embedding_param(layout: "NativeLayout") -> NativeParam:
    """The embedding split over hidden ([vocab, hidden/tp]) or over the vocabulary ([vocab/tp, hidden])."""
    split = COLUMNS if layout.embed_split_hidden else ROWS
    if layout.family != "internlm":  # one name both ways (revert_internlm.py); see `local_names` for the other
        name = "tok_embeddings.weight"
    else:
        name = "embedding.weight" if layout.embed_split_hidden else "embedding.word_embeddings.weight"
    return NativeParam(name, ("model.embed_tokens.weight",), split)


LLAMA_HEAD = (NativeParam("norm.weight", ("model.norm.weight",), Replicated()),
              NativeParam("output.weight", ("lm_head.weight",), ROWS))
HEAD_PARAMS = {
    "internlm": (NativeParam("norm.weight", ("model.norm.weight",), Replicated()),
                 NativeParam("head.weight", ("lm_head.weight",), ROWS)),
    "llama": LLAMA_HEAD,
    "internlm2": LLAMA_HEAD,
}
BLOCK_PARAMS = {"internlm": internlm_block_params, "llama": llama_block_params, "internlm2": llama_block_params}


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
    family: str = "internlm"
    bias: bool = True  # q/k/v/o biases; InternEvo's model key no_bias=True leaves them out
    # the attention heads: how q/k/v rows split over tensor ranks under grouped-query attention; the internlm2 family
    # and qk_interleaved need them (write_native_checkpoint fills them in from the model dict)
    heads: AttentionHeads | None = None
    qk_interleaved: bool = False  # q/k rows with interleaved rotary pairs in each head (see InterleavedRotary)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise CheckpointError(f"native layout {self.family!r} is unknown; use one of {FAMILIES}")

    @property
    def saved_prefix(self) -> str:
        """What evods puts before the names it writes: InternLM's files as InternEvo's NaiveAMP wrapper saved them,
        LLaMA's as revert_internlm.py writes them."""
        return PREFIX if self.family == "internlm" else ""

    def stage_params(self, stage: int, layers: range) -> list[tuple[str, tuple[str, ...], object]]:
        """(native name, HF names, split) of every parameter of `stage`, which holds `layers`."""
        def resolve(param: NativeParam, local: int = 0, layer: int = 0):
            return param.native.format(i=local), tuple(n.format(i=layer) for n in param.hf), param.split

        params = [resolve(embedding_param(self))] if stage == 0 else []
        params += [resolve(param, local, layer) for local, layer in enumerate(layers)
                   for param in BLOCK_PARAMS[self.family](self)]
        if stage == self.pp - 1:
            params += [resolve(param) for param in HEAD_PARAMS[self.family]]
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
                    # its own storage: torch.save would write the whole full tensor
                    state[layout.saved_prefix + native] = tensor.clone()
            files[(rank, stage)] = state
    return files


def local_names(state: dict, family: str) -> dict:
    """A stage file's state under the names of InternEvo's (unwrapped) model: no `model.` prefix, blocks numbered from
    0, and the llama family's vocabulary-split embedding under the one name `tok_embeddings.weight`."""
    if state and all(name.startswith(PREFIX) for name in state):
        state = {name[len(PREFIX):]: tensor for name, tensor in state.items()}
    block = BLOCK_INDEX[family]
    indices = sorted({int(match.group(1)) for name in state if (match := block.match(name))})
    local = {old: new for new, old in enumerate(indices)}
    renamed = {}
    for name, tensor in state.items():
        if match := block.match(name):
            name = f"{match.group(0).split('.')[0]}.{local[int(match.group(1))]}.{name[match.end():]}"
        renamed[name.replace("tok_embeddings.word_embeddings.", "tok_embeddings.")] = tensor
    return renamed


def detect_family(state: dict) -> str:
    """The family of names of a stage file's state."""
    names = local_names(state, "llama")
    if any(".attention.wqkv." in name for name in names):
        return "internlm2"
    llama = any(name.startswith(("layers.", "tok_embeddings.", "output.")) for name in names)
    return "llama" if llama else "internlm"


def merge_shards(files: dict[tuple[int, int], dict], layout: NativeLayout, source: str) -> dict[str, torch.Tensor]:
    """Full HF-named weights from every model_tp{t}_pp{p}.pt state dict; stage sizes are read from the files."""
    weights, first_layer = {}, 0
    for stage in range(layout.pp):
        stage_files = [local_names(files[(rank, stage)], layout.family) for rank in range(layout.tp)]
        layers = range(first_layer, first_layer + _block_count(stage_files[0], layout.family))
        first_layer = layers.stop
        params = layout.stage_params(stage, layers)
        for rank, state in enumerate(stage_files):
            # only tensor rank 0 holds a row-parallel bias
            expected = {native for native, _, split in params if rank == 0 or not isinstance(split, FirstRankOnly)}
            _check_names(set(state), expected, layout, f"{source}: model_tp{rank}_pp{stage}.pt")
        for native, hf_names, split in params:
            shards = [state[native] for state in stage_files if native in state]
            for name, tensor in zip(hf_names, split.merge(shards)):
                weights[name] = tensor
    _check_mlp_naming(weights, layout, source)
    if first_layer != layout.num_layers:
        raise CheckpointError(f"{source}: the stages hold {first_layer} blocks, model_config.pt says "
                              f"num_layers={layout.num_layers}")
    return weights


def _block_count(state: dict, family: str) -> int:
    return len({match.group(1) for name in state if (match := BLOCK_INDEX[family].match(name))})


def _check_names(found: set[str], expected: set[str], layout: NativeLayout, where: str) -> None:
    """A one-line error naming what does not fit: the other family, biases, MoE experts, or two unexpected names."""
    unexpected, missing = sorted(found - expected), sorted(expected - found)
    if not unexpected and not missing:
        return
    found_family = detect_family(dict.fromkeys(found))
    bias_names = {name for name in unexpected + missing if name.endswith(".bias")}
    if found_family != layout.family:
        cause = f"they are InternEvo's {found_family} layout; load it with {FAMILY_CKPT_TYPES[found_family]}"
    elif any(".experts." in name for name in unexpected):
        cause = "MoE experts are not supported"
    elif bias_names and bias_names == set(unexpected + missing):
        has = "has" if unexpected else "has no"
        cause = (f"the checkpoint {has} q/k/v/o biases, but its model_config.pt says "
                 f"no_bias={not layout.bias}")
    else:
        cause = f"{len(unexpected)} unexpected, {len(missing)} missing"
    examples = ", ".join((unexpected or missing)[:2])
    kind = "unexpected" if unexpected else "missing"
    raise CheckpointError(f"{where}: its parameter names do not fit InternEvo's {layout.family} layout ({kind}: "
                          f"{examples}, ...): {cause}")


def _check_mlp_naming(weights: dict[str, torch.Tensor], layout: NativeLayout, source: str) -> None:
    """gate and up are [intermediate, hidden], down the transpose: a wrong naming swaps up and down."""
    mlp = "model.layers.0.mlp"
    gate, up, down = (weights[f"{mlp}.{p}.weight"].shape for p in ("gate_proj", "up_proj", "down_proj"))
    if up != gate or down != gate[::-1]:
        other = next(naming for naming in MLP_NAMINGS if naming != layout.mlp_naming)
        raise CheckpointError(f"{source}: the MLP weights do not fit naming {layout.mlp_naming} "
                              f"({MLP_NAMINGS[layout.mlp_naming]}); it looks like naming {other} "
                              f"({MLP_NAMINGS[other]})")


def mlp_naming_of_shapes(state: dict, family: str) -> str:
    """The MLP naming a stage file's shapes show: the down projection is [hidden, intermediate/tp]; "v2" (the LLaMA
    convention) when the shapes cannot tell (square MLP, or a stage without blocks)."""
    prefix = "blocks.0.mlp" if family == "internlm" else "layers.0.feed_forward"
    w1, w2 = state.get(f"{prefix}.w1.weight"), state.get(f"{prefix}.w2.weight")
    if w1 is None or w2 is None or w1.shape[0] == w1.shape[1]:
        return "v2"
    return "v1" if w2.shape == w1.shape else "v2"
