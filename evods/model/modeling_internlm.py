"""evods' decoder core as a Hugging Face model: LLaMA's layout with fp32 RMSNorm, rotate-half RoPE and SwiGLU, and
InternLM's names and defaults. InternLM v1 is its multi-head case with biases on q/k/v/o; grouped-query attention
(`num_key_value_heads`), bias-free projections and the RoPE's base and scaling (`config.rope`) are configuration,
so later families are this same model with another config.

One forward takes two kinds of input:
- packed rows (no `attention_mask`, no filled cache): several documents concatenated in a row, each starting where
  `position_ids == 0`. Attention never crosses a document; the kernel is `config.packed_attention`.
- ordinary HF batches (an `attention_mask` with left or right padding, or a filled KV cache): transformers' masks
  and its `attn_implementation`.
A row whose position_ids are 0..T-1 is one document, so plain training batches take the packed path.

This file is also the remote code of exported folders: `save_pretrained` copies it, `configuration_internlm.py`,
`chat_templates.py` and `transformers_compat.py` next to the weights, so the folder loads with `trust_remote_code=True`
where evods is not installed, on transformers 4.36 to 5.x. It therefore imports only torch, those files and the parts
of transformers that every such version has; what differs between versions comes from `transformers_compat` (one
model for training and for export, instead of a second copy that would drift).
"""

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .chat_templates import ChatTemplate, chat_messages, chat_template_named, check_tokenizer, stop_token_ids
from .configuration_internlm import InternLMConfig, Rope
from .transformers_compat import (
    CACHE_NAME,
    GENERATION_PREPARES_INPUTS,
    TIED_HEAD_KEYS,
    TRANSFORMERS_BUILDS_MASKS,
    attention_function,
    build_causal_mask,
    causal_lm_loss,
    init_copy_,
    legacy_prepare_inputs_for_generation,
    new_cache,
    repeat_kv_heads,
)

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # torch's own flash-attention varlen kernel (CUDA only), in torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


class InternLMRMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the input dtype (InternEvo casts every norm input to fp32)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(self.weight.dtype)


class InternLMRotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables in fp32 for the RoPE of `config.rope`: InternEvo's dynamic NTK base for sequences
    beyond max_position_embeddings, or the frequencies scaled once ("linear", "llama3")."""

    def __init__(self, config: InternLMConfig):
        super().__init__()
        self.rope = config.rope
        self.head_dim = config.head_dim
        self.base = self.rope.base
        self.dynamic = self.rope.type == "dynamic"
        self.scaling_factor = self.rope.factor
        self.max_position_embeddings = config.max_position_embeddings
        # Not saved (InternEvo checkpoints have no inv_freq); `_init_weights` refills it after from_pretrained.
        self.register_buffer("inv_freq", self.inv_freq_for_base(self.base), persistent=False)

    def reset_inv_freq(self) -> None:
        """Recompute the (unsaved) inverse frequencies into the buffer, in its dtype, as `__init__` computes them."""
        init_copy_(self.inv_freq, self.inv_freq_for_base(self.base))

    def inv_freq_for_base(self, base: float, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return scaled_frequencies(1.0 / (base**exponents), self.rope)

    def rescales(self, seq_len: int) -> bool:
        """Whether a total length `seq_len` gets another base than the configured one."""
        return self.dynamic and seq_len > self.max_position_embeddings

    def base_for_length(self, seq_len: int) -> float:
        """The RoPE base for a total length `seq_len` (past + current tokens, or max(position_ids) + 1)."""
        if not self.rescales(seq_len):
            return self.base
        alpha, d = self.scaling_factor, self.head_dim
        return self.base * (alpha * seq_len / self.max_position_embeddings - (alpha - 1)) ** (d / (d - 2))

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a total length `seq_len`, fp32, shaped [B, T, head_dim]."""
        return self.tables(position_ids, self.base_for_length(seq_len))

    def tables(self, position_ids: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq if base == self.base else self.inv_freq_for_base(base, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def scaled_frequencies(inv_freq: torch.Tensor, rope: Rope) -> torch.Tensor:
    """The inverse frequencies of a "linear" or "llama3" RoPE from the plain ones, as transformers'
    `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` compute them (other types unchanged).

    llama3: a frequency whose wavelength 2*pi/f spans fewer than original_max_position_embeddings / high_freq_factor
    positions is kept, one spanning more than original_max_position_embeddings / low_freq_factor is divided by
    `factor`, and one between is blended, the weight of the kept one growing linearly in
    original_max_position_embeddings / wavelength from low_freq_factor to high_freq_factor."""
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type != "llama3":
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    kept_weight = ((rope.original_max_position_embeddings / wavelength - rope.low_freq_factor)
                   / (rope.high_freq_factor - rope.low_freq_factor)).clamp(0.0, 1.0)
    # in this order, the two ends give exactly inv_freq and inv_freq / factor, as transformers' selection does
    return (1 - kept_weight) * inv_freq / rope.factor + kept_weight * inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 2) -> torch.Tensor:
    """x: [B, T, heads, head_dim] (or [B, heads, T, head_dim] with heads_dim=1); cos, sin: [B, T, head_dim]."""
    cos = cos.unsqueeze(heads_dim).to(x.dtype)
    sin = sin.unsqueeze(heads_dim).to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class CachedKeysRotation:
    """How keys go into and come out of the KV cache once dynamic NTK has changed the RoPE base.

    The cache always holds keys rotated with the configured base, the base of every step as long as the total length
    stays within max_position_embeddings (and of origin RoPE always), so that those steps rotate only their new keys.
    Past that length the base changes with every step, and all keys, cached ones included, must be rotated with the
    current length's base, as InternLM's published HF code and InternEvo's native inference do (they cache un-rotated
    keys and rotate all of them at every step).
    """

    stored: tuple[torch.Tensor, torch.Tensor]  # cos/sin of the configured base at the new tokens' positions
    to_current: tuple[torch.Tensor, torch.Tensor]  # cos/sin of the (current - configured) angle, every key

    @classmethod
    def for_step(cls, rotary: "InternLMRotaryEmbedding", position_ids: torch.Tensor,
                 past_len: int) -> "CachedKeysRotation":
        """`position_ids`: the new tokens'. A row's keys hold the consecutive positions that end at its last token
        (the padding of a left-padded row lies before position 0; it is masked)."""
        total_len = past_len + position_ids.shape[1]
        key_positions = position_ids[:, -1:] - torch.arange(total_len - 1, -1, -1, device=position_ids.device)
        cos_stored, sin_stored = rotary.tables(key_positions, rotary.base)
        cos_current, sin_current = rotary.tables(key_positions, rotary.base_for_length(total_len))
        # rotation by the (current - configured) angle, from the two tables: exact to rounding
        to_current = (cos_current * cos_stored + sin_current * sin_stored,
                      sin_current * cos_stored - cos_current * sin_stored)
        return cls(rotary.tables(position_ids, rotary.base), to_current)


@dataclass
class PackedDocuments:
    """Document layout of packed rows, derived from position_ids (a document starts wherever position_ids == 0).

    Offsets index the flattened [B*T] tokens; a document never spans two rows because every row starts at 0.
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [num_docs + 1], for flash-attn varlen
    max_seqlen: int
    groups: list[tuple[int, int]]  # (document length, number of documents), the documents sorted by length
    order: torch.Tensor | None  # token permutation that sorts the documents by length; None when already sorted
    inverse_order: torch.Tensor | None

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "PackedDocuments":
        starts = position_ids[:, 0]
        if (starts != 0).any():
            row = int((starts != 0).nonzero()[0])
            raise ValueError(
                f"position_ids of row {row} start at {int(starts[row])}: in a packed row (no attention_mask, no "
                "cache) every row must start a document, with position 0."
            )
        batch, seq_len = position_ids.shape
        doc_starts = (position_ids.flatten() == 0).nonzero().flatten()
        total = torch.tensor([batch * seq_len], device=doc_starts.device)
        cu_seqlens = torch.cat([doc_starts, total]).to(torch.int32)
        offsets = cu_seqlens.tolist()
        starts_by_length = {}
        for start, end in zip(offsets[:-1], offsets[1:]):
            starts_by_length.setdefault(end - start, []).append(start)
        groups = [(length, len(starts)) for length, starts in starts_by_length.items()]
        order = inverse_order = None
        if [start for starts in starts_by_length.values() for start in starts] != offsets[:-1]:
            order = torch.cat([
                (torch.tensor(starts)[:, None] + torch.arange(length)).flatten()
                for length, starts in starts_by_length.items()
            ]).to(position_ids.device)
            inverse_order = torch.empty_like(order)
            inverse_order[order] = torch.arange(len(order), device=order.device)
        return cls(position_ids, cu_seqlens, max(starts_by_length), groups, order, inverse_order)


# The packed backends take q [B, T, H, D] and k, v [B, T, KV, D]: KV < H is grouped-query attention, H / KV query heads
# per KV head, counted in the tensors (so the local heads of a tensor-parallel rank need nothing more). The kernels
# read the KV heads as they are (SDPA's and flex's `enable_gqa`, flash-attn's native GQA) instead of copying them
# H / KV times; only a torch without `enable_gqa` gets them repeated (before 2.5, which an exported model may meet;
# torch varlen releases without it).
SDPA_TAKES_GQA = torch.__version__ >= "2.5"


def grouped_attention_inputs(q, k, v) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k, v and the SDPA / flex attention keyword arguments for q [B, H, T, D] and k, v [B, KV, T, D]."""
    if k.shape[1] == q.shape[1]:
        return k, v, {}
    if SDPA_TAKES_GQA:
        return k, v, {"enable_gqa": True}
    return repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1]), {}


def packed_attention_loop(q, k, v, documents: PackedDocuments, scaling: float) -> torch.Tensor:
    """Causal SDPA per document; q [B, T, H, D], k and v [B, T, KV, D] in, [B, T, H, D] out.

    Documents of equal length share one batched call (CPU SDPA's backward costs tens of ms per call); a row of one
    document is a single plain causal call.
    """
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # [B*T, heads, D]
    if documents.order is not None:
        q, k, v = (x.index_select(0, documents.order) for x in (q, k, v))
    sizes = [length * count for length, count in documents.groups]
    outs = []
    for (length, count), q_g, k_g, v_g in zip(documents.groups, q.split(sizes), k.split(sizes), v.split(sizes)):
        q_g = q_g.view(count, length, heads, head_dim).transpose(1, 2)
        k_g, v_g = (x.view(count, length, kv_heads, head_dim).transpose(1, 2) for x in (k_g, v_g))
        k_g, v_g, gqa = grouped_attention_inputs(q_g, k_g, v_g)
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, is_causal=True, scale=scaling, **gqa)
        outs.append(out.transpose(1, 2).reshape(length * count, heads, head_dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if documents.inverse_order is not None:
        out = out.index_select(0, documents.inverse_order)
    return out.view(batch, seq_len, heads, head_dim)


def packed_attention_mask(q, k, v, documents: PackedDocuments, scaling: float) -> torch.Tensor:
    """One SDPA with a block-diagonal causal bool mask; q [B, T, H, D], k and v [B, T, KV, D] in, [B, T, H, D] out."""
    doc_ids = (documents.position_ids == 0).cumsum(-1)
    seq_len = q.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    k, v, gqa = grouped_attention_inputs(*(x.transpose(1, 2) for x in (q, k, v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scaling, **gqa)
    return out.transpose(1, 2)


def packed_attention_flash(q, k, v, documents: PackedDocuments, scaling: float) -> torch.Tensor:
    """flash-attn varlen over the flattened tokens; q [B, T, H, D], k and v [B, T, KV, D] (flash-attn takes fewer KV
    heads as they are) in, [B, T, H, D] out. fp32 runs in bf16, as InternEvo does."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q_flat, k_flat, v_flat = (x.flatten(0, 1).to(dtype) for x in (q, k, v))
    cu, max_len = documents.cu_seqlens, documents.max_seqlen
    out = flash_attn_varlen_func(q_flat, k_flat, v_flat, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True)
    return out.unflatten(0, q.shape[:2]).to(q.dtype)


def _torch_varlen_parameters() -> set[str]:
    """torch 2.10/2.11 take `is_causal=True`, later releases `window_size=(-1, 0)`; `scale` and `enable_gqa` came
    after the first release."""
    import inspect

    return set(inspect.signature(torch_varlen_attn).parameters)


def torch_varlen_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                           parameters: set[str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k, v and the keyword arguments for `varlen_attn` with `parameters`, for flattened q [N, H, D] and k, v
    [N, KV, D]: a release without `enable_gqa` gets the KV heads repeated (query head h reads KV head h // (H / KV))."""
    kwargs = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    if abs(scaling - q.shape[-1] ** -0.5) > 1e-12:  # without `scale` a release uses 1/sqrt(head_dim)
        kwargs["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return k, v, kwargs


def packed_attention_varlen(q, k, v, documents: PackedDocuments, scaling: float) -> torch.Tensor:
    """torch's own varlen flash attention (`torch.nn.attention.varlen`, CUDA only): flash-attn's kernel with no extra
    package. q [B, T, H, D], k and v [B, T, KV, D] in, [B, T, H, D] out; fp32 runs in bf16, as with flash-attn."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q_flat, k_flat, v_flat = (x.flatten(0, 1).to(dtype) for x in (q, k, v))
    cu, max_len = documents.cu_seqlens, documents.max_seqlen
    k_flat, v_flat, kwargs = torch_varlen_arguments(q_flat, k_flat, v_flat, scaling, _torch_varlen_parameters())
    out = torch_varlen_attn(q_flat, k_flat, v_flat, cu, cu, max_len, max_len, **kwargs)
    return out.unflatten(0, q.shape[:2]).to(q.dtype)


_compiled_flex_attention = None


def packed_attention_flex(q, k, v, documents: PackedDocuments, scaling: float) -> torch.Tensor:
    """flex attention with a block-diagonal causal document mask; q [B, T, H, D], k and v [B, T, KV, D] in,
    [B, T, H, D] out. Compiled on CUDA (a fused kernel that skips the masked blocks); eager elsewhere, where it
    supports the forward only."""
    global _compiled_flex_attention
    if flex_attention is None:
        raise RuntimeError("packed_attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5).")
    doc_ids = (documents.position_ids == 0).cumsum(-1)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq_len = doc_ids.shape
    block_mask = create_block_mask(same_document_causal, batch, None, seq_len, seq_len, device=q.device)
    attend = flex_attention
    if q.is_cuda:
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex_attention
    k, v, gqa = grouped_attention_inputs(*(x.transpose(1, 2) for x in (q, k, v)))
    out = attend(q.transpose(1, 2), k, v, block_mask=block_mask, scale=scaling, **gqa)
    return out.transpose(1, 2)


PACKED_ATTENTION = {"loop": packed_attention_loop, "mask": packed_attention_mask, "flash": packed_attention_flash,
                    "varlen": packed_attention_varlen, "flex": packed_attention_flex}


def auto_packed_attention(device_type: str, flash: bool, varlen: bool, flex: bool) -> str:
    """The backend "auto" means: on CUDA flash-attn if importable, then torch's varlen flash kernel, then compiled
    flex attention; the per-document SDPA loop otherwise (the fastest on CPU, where flex has no backward)."""
    if device_type != "cuda":
        return "loop"
    for name, available in (("flash", flash), ("varlen", varlen), ("flex", flex)):
        if available:
            return name
    return "loop"


def packed_attention_backend(name: str, device: torch.device) -> Callable:
    """The packed-attention function `name` ("auto": see `auto_packed_attention`) for tensors on `device`; a CUDA
    kernel that cannot run there is a RuntimeError saying what it needs."""
    if name == "auto":
        name = auto_packed_attention(device.type, flash_attn_varlen_func is not None, torch_varlen_attn is not None,
                                     flex_attention is not None)
    cuda_kernels = {"flash": (flash_attn_varlen_func, "the flash-attn package"),
                    "varlen": (torch_varlen_attn, "torch >= 2.10 (torch.nn.attention.varlen)")}
    if name in cuda_kernels and (cuda_kernels[name][0] is None or device.type != "cuda"):
        raise RuntimeError(f"packed_attention='{name}' needs {cuda_kernels[name][1]} and CUDA tensors.")
    return PACKED_ATTENTION[name]


class InternLMAttention(nn.Module):
    """Self-attention with `num_attention_heads` query heads and `num_key_value_heads` key/value heads (grouped-query
    attention when fewer; the KV cache holds the KV heads only). The number of heads is read off the projections'
    outputs, so a module whose projections hold a slice of the heads (tensor parallelism) computes that slice."""

    def __init__(self, config: InternLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        # Read by transformers' attention functions; whoever splits the heads over ranks sets it to the local ratio.
        self.is_causal = True
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        hidden, kv_size = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, hidden, bias=config.bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=config.bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=config.bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        documents: PackedDocuments | None = None,
        cache: Cache | None = None,
        cached_keys_rotation: CachedKeysRotation | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(hidden_states)
        q = apply_rotary(q, *position_embeddings)
        if cache is None:
            k = apply_rotary(k, *position_embeddings)
        else:
            k, v = self.all_keys_and_values(k, v, position_embeddings, cache, cached_keys_rotation)
        if documents is not None:
            # Packed rows come with an empty cache: the keys are the current tokens' own.
            attn_fn = packed_attention_backend(self.config.packed_attention, q.device)
            out = attn_fn(q, k, v, documents, self.scaling)
        else:
            attn_fn = attention_function(self.config._attn_implementation)
            out, _ = attn_fn(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                             scaling=self.scaling, dropout=0.0)
        # Shapes come from the projections' outputs, not from hidden_states: under sequence parallelism with a head
        # split (evods.parallel.ulysses) the projections return every token of a share of the heads.
        return self.o_proj(out.flatten(-2))

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, D], k and v [B, T, KV, D], before RoPE."""
        return tuple(proj(hidden_states).unflatten(-1, (-1, self.head_dim))
                     for proj in (self.q_proj, self.k_proj, self.v_proj))

    def all_keys_and_values(self, k, v, position_embeddings, cache: Cache, rotation: CachedKeysRotation | None):
        """Append this step's un-rotated keys `k` and values `v` ([B, T, KV, D]) to the cache; return every key, turned
        to the current RoPE base, and every value ([B, past + T, KV, D])."""
        stored = position_embeddings if rotation is None else rotation.stored
        keys, values = cache.update(apply_rotary(k, *stored).transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        if rotation is not None and keys.shape[2] == k.shape[1]:  # nothing was cached: rotate the new keys directly
            keys = apply_rotary(k, *position_embeddings).transpose(1, 2)
        elif rotation is not None:  # in the cache's own layout [B, KV, T, D]: one pass over contiguous memory
            keys = apply_rotary(keys, *rotation.to_current, heads_dim=1)
        return keys.transpose(1, 2), values.transpose(1, 2)


class InternLMMLP(nn.Module):
    def __init__(self, config: InternLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class InternLMDecoderLayer(nn.Module):
    """Pre-norm block. `gradient_checkpointing` (see `set_activation_checkpointing`, or transformers'
    `gradient_checkpointing_enable`, which sets it with `_gradient_checkpointing_func`) recomputes it in backward."""

    gradient_checkpointing = False
    # the parts' classes: another layout of the same computation (modeling_internlm2.py) names its own
    attention_class, mlp_class = InternLMAttention, InternLMMLP

    def __init__(self, config: InternLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = self.mlp_class(config)
        self.input_layernorm = InternLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = InternLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        documents: PackedDocuments | None = None,
        cache: Cache | None = None,
        cached_keys_rotation: CachedKeysRotation | None = None,
    ) -> torch.Tensor:
        args = (hidden_states, position_embeddings, attention_mask, documents, cache, cached_keys_rotation)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self.block, *args)
        return self.block(*args)

    def block(self, hidden_states, position_embeddings, attention_mask, documents, cache, cached_keys_rotation):
        attn_out = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                  documents, cache, cached_keys_rotation)
        hidden_states = hidden_states + attn_out.to(hidden_states.dtype)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + mlp_out.to(hidden_states.dtype)


def check_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """position_ids as [B, T] (a [1, T] row is broadcast), or a ValueError saying how the shapes disagree."""
    if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids has shape {list(position_ids.shape)} but the input has shape [{batch}, {seq_len}]: "
            "give one position per input token."
        )
    return position_ids.expand(batch, seq_len)


def packed_rope_length(position_ids: torch.Tensor, rotary: InternLMRotaryEmbedding) -> int:
    """Length that sets the dynamic NTK base of packed rows: max(position_ids) + 1 (only read when it matters)."""
    return int(position_ids.max()) + 1 if rotary.dynamic else 0


class InternLMPreTrainedModel(PreTrainedModel):
    config_class = InternLMConfig
    config: InternLMConfig
    base_model_prefix = "model"
    # InternLM v1 HF checkpoints made by InternLM's convert2hf.py carry these (recomputed) buffers.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLMDecoderLayer"]
    _supports_sdpa = True
    # Other attention implementations need the masks that only transformers 5 builds (see transformers_compat).
    _supports_flash_attn = TRANSFORMERS_BUILDS_MASKS
    _supports_attention_backend = TRANSFORMERS_BUILDS_MASKS

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers', but parameter names that disagree with the config are an error, not a warning.

        (A checkpoint with q/k/v/o biases loaded under `bias=False` would otherwise drop them silently. Shapes
        that disagree already raise in transformers, after its load report.)
        """
        return_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        mismatches = {kind: sorted(loading_info[kind]) for kind in ("missing_keys", "unexpected_keys")}
        if any(mismatches.values()):
            raise ValueError(
                f"the checkpoint's parameters do not match the config ({cls.__name__}, bias={model.config.bias}, "
                f"num_hidden_layers={model.config.num_hidden_layers}): {mismatches}"
            )
        return (model, loading_info) if return_loading_info else model

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, InternLMRotaryEmbedding):
            # Buffers come back uninitialized from the meta device after from_pretrained.
            module.reset_inv_freq()


class InternLMModel(InternLMPreTrainedModel):
    decoder_layer_class = InternLMDecoderLayer

    def __init__(self, config: InternLMConfig):
        super().__init__(config)
        # No padding_idx: InternLM's pad id is often EOS, which must keep learning in packed training.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = InternLMRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`cache` (transformers 5) and `past_key_values` (4.x) are the same argument."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training  # a training step never needs a cache
        if use_cache and cache is None:
            cache = new_cache(self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]
        position_ids = check_position_ids(position_ids, batch, seq_len)

        causal_mask, documents = None, None
        if attention_mask is None and past_len == 0:
            documents = PackedDocuments.from_position_ids(position_ids)
            rope_length = packed_rope_length(position_ids, self.rotary_emb)
        else:
            causal_mask = build_causal_mask(self.config, inputs_embeds, attention_mask, cache, past_len, position_ids)
            rope_length = past_len + seq_len
        position_embeddings = self.rotary_emb(position_ids, rope_length)
        cached_keys_rotation = None
        if cache is not None and self.rotary_emb.rescales(rope_length):
            cached_keys_rotation = CachedKeysRotation.for_step(self.rotary_emb, position_ids, past_len)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask=causal_mask, documents=documents,
                                  cache=cache, cached_keys_rotation=cached_keys_rotation)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})


@dataclass
class InternLMCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output, plus the final hidden states when the head is skipped (`skip_lm_head=True`)."""

    last_hidden_state: torch.Tensor | None = None


class InternLMForCausalLM(InternLMPreTrainedModel, GenerationMixin):
    base_model_class = InternLMModel
    _tied_weights_keys = TIED_HEAD_KEYS  # only where config.tie_word_embeddings

    def __init__(self, config: InternLMConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        skip_lm_head: bool = False,
        **kwargs,
    ) -> InternLMCausalLMOutput:
        """Logits are fp32 (as InternEvo's last stage). `labels` are unshifted, as in transformers. `cache`
        (transformers 5) and `past_key_values` (4.x) are the same argument.

        `skip_lm_head=True` returns the final (normed) hidden states in `last_hidden_state` and no logits: a training
        loss that applies the head itself, a chunk of tokens at a time, never holds the [tokens, vocab] logits.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state[:, -logits_to_keep:]
        cache = getattr(outputs, CACHE_NAME)
        if skip_lm_head:
            return InternLMCausalLMOutput(last_hidden_state=hidden_states, **{CACHE_NAME: cache})
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = causal_lm_loss(self, logits, labels, self.config.vocab_size, **kwargs)
        return InternLMCausalLMOutput(loss=loss, logits=logits, **{CACHE_NAME: cache})

    if not GENERATION_PREPARES_INPUTS:  # transformers < 4.45 leaves this to the model
        prepare_inputs_for_generation = legacy_prepare_inputs_for_generation

    def set_rotary_type(self, rotary_type: str) -> None:
        """Switch between dynamic NTK ("dynamic") and plain RoPE ("origin") in place: the next forward uses it, so
        one loaded model compares the two. config.rotary follows, so that save_pretrained writes what runs. (A KV
        cache holds keys rotated with the configured base under both: a cache stays valid across the switch.)"""
        if rotary_type not in ("origin", "dynamic"):
            raise ValueError(f"rotary type {rotary_type!r}: expected 'origin' or 'dynamic'")
        if self.config.rope.type not in ("origin", "dynamic"):  # its frequencies are scaled, not only its base
            raise ValueError(f"this model's RoPE is {self.config.rope.type!r}; only 'origin' and 'dynamic' switch")
        self.config.rotary = {**self.config.rotary, "type": rotary_type}
        self.config.derive_rope_keys()
        self.model.rotary_emb.dynamic = rotary_type == "dynamic"

    @property
    def chat_format(self) -> ChatTemplate:
        """The chat template `config.chat_template` names (evods.model.chat_templates): the format of `chat`."""
        return chat_template_named(self.config.chat_template)

    def build_inputs(self, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), meta_instruction: str = ""):
        """The chat prompt for `query` after `history` ((query, reply) pairs) and an optional system prompt, in the
        model's chat format, tokenized: a BatchEncoding of one row, as InternLM's `build_inputs`."""
        template = self.chat_format
        check_tokenizer(template, tokenizer)
        prompt = tokenizer.apply_chat_template(chat_messages(query, history, meta_instruction),
                                               chat_template=template.jinja, tokenize=False,
                                               add_generation_prompt=True)
        return tokenizer([prompt], return_tensors="pt", add_special_tokens=False)

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), streamer=None,
             max_new_tokens: int = 1024, do_sample: bool = True, temperature: float = 0.8, top_p: float = 0.8,
             meta_instruction: str = "", **generate_kwargs) -> tuple[str, list[tuple[str, str]]]:
        """InternLM's chat: the reply to `query` after `history`, and the history with this turn appended.

        The prompt is the model's chat format (`config.chat_template`: InternLM's `<|User|>:{query}<eoh>\n<|Bot|>:`
        unless it names another), with `meta_instruction` as the system prompt; the reply ends at the format's end of
        turn or EOS. The defaults sample as InternLM's chat does, `do_sample=False` is greedy, and any other
        `generate` argument passes through (`top_k`, `repetition_penalty`, a `streamer`, ...).
        """
        inputs = self.build_inputs(tokenizer, query, history, meta_instruction).to(self.device)
        stop_ids = stop_token_ids(self.chat_format, tokenizer)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else stop_ids[0])
        output = self.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                               eos_token_id=stop_ids, **sampling, **generate_kwargs)
        reply = decode_reply(tokenizer, output[0, inputs["input_ids"].shape[1]:].tolist(), stop_ids,
                             self.chat_format.end_of_turn)
        return reply, [*history, (query, reply)]

    def stream_chat(self, tokenizer, query: str, history: Sequence[tuple[str, str]] = (),
                    **chat_kwargs) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """As `chat`, streamed as InternLM's `stream_chat`: yields (the reply so far, the history with it) each time
        the reply grows; the last is what `chat` returns. Generation runs in a thread; closing the generator (a
        consumer that stops early, Ctrl-C) ends it at the next token."""
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        chat_kwargs["stopping_criteria"] = StoppingCriteriaList([*chat_kwargs.get("stopping_criteria", ()),
                                                                 StopOnEvent(stop)])
        end_of_turn = self.chat_format.end_of_turn
        outcome = {}

        def run():
            try:
                outcome["result"] = self.chat(tokenizer, query, history, streamer=streamer, **chat_kwargs)
            except BaseException as error:  # re-raised in the caller's thread
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, name="stream_chat", daemon=True)
        thread.start()
        text, reply = "", ""
        try:
            for piece in streamer:
                text += piece
                grown = text.split(end_of_turn)[0]
                if grown != reply:
                    reply = grown
                    yield reply, [*history, (query, reply)]
        finally:
            stop.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        if outcome["result"][0] != reply:  # the decoded ids are the reference (`chat`'s own result)
            yield outcome["result"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', with `auto_map` also mapping AutoModel to this class, as InternLM's published folders do
        (code written for them loads the chat model with AutoModel)."""
        remote_class = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": remote_class}
        return super().save_pretrained(save_directory, *args, **kwargs)


def decode_reply(tokenizer, new_ids: list[int], stop_ids: list[int], end_of_turn: str) -> str:
    """The text of the generated ids up to the first stop token (or a spelled-out end of turn: a tokenizer whose end
    token is an ordinary piece, as InternLM's `<eoa>`, decodes it as text)."""
    end = next((i for i, token in enumerate(new_ids) if token in stop_ids), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).split(end_of_turn)[0]


class StopOnEvent(StoppingCriteria):
    """Ends generation once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.event.is_set()


def set_activation_checkpointing(model: nn.Module | list[nn.Module], fraction: float | bool) -> int:
    """Recompute the FIRST int(num_layers * fraction) decoder layers in backward, as InternEvo's `checkpoint`.

    `model` is an InternLM model or a list of pipeline stages (which wrap the same layers). True means 1.0, False
    0.0. Returns the number of checkpointed layers.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"activation checkpointing fraction must be in [0, 1], got {fraction}")
    parts = model if isinstance(model, list) else [model]
    layers = [m for part in parts for m in part.modules() if isinstance(m, InternLMDecoderLayer)]
    num_checkpointed = int(len(layers) * fraction)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < num_checkpointed
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return num_checkpointed


__all__ = [
    "InternLMPreTrainedModel",
    "InternLMModel",
    "InternLMForCausalLM",
    "InternLMCausalLMOutput",
    "set_activation_checkpointing",
]
