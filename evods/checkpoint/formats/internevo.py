"""InternEvo native checkpoint folders: their model as full HF weights, their run state as evods' state, and
writing one from full weights at any tensor/pipeline size (the tensors are laid out by internevo_layout.py).

    model_tp{t}_pp{p}.pt     the stage's weights (see internevo_layout.py)
    topo_tp{t}_pp{p}.json    {module: {"dim": 0}} for the vocab-parallel embedding (torch-saved, as InternEvo)
    model_config.pt          the training config's `model` dict, dtype as a torch dtype
    context.pt               {batch_count, step_count, num_consumed_tokens, inf_nan_skip_batches, ...}
    sampler.pt               the batch sampler's state (InternEvo's keys, which evods' sampler shares)
    schedulder.pt            (sic) the lr scheduler's state
    {step}.step              {"step": step}, written last

InternEvo's optimizer files (HybridZero's flat partitions) have no DeepSpeed counterpart and are neither read nor
written.
"""
import os
import re
from dataclasses import replace

import torch

from evods.model import InternLMConfig, config_from_model_dict, intermediate_size

from ..errors import CheckpointError
from ..safe_load import NUMPY_ARRAYS, load_file
from .internevo_layout import (
    AttentionHeads,
    NativeLayout,
    detect_family,
    local_names,
    merge_shards,
    mlp_naming_of_shapes,
    shard_weights,
)

MODEL_CONFIG = "model_config.pt"
CONTEXT = "context.pt"
SAMPLER = "sampler.pt"
SCHEDULER = "schedulder.pt"  # InternEvo's spelling in every version
MODEL_FILE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def is_native_checkpoint(names: list[str]) -> bool:
    """Whether a folder with these file names is an InternEvo native checkpoint."""
    return any(MODEL_FILE.match(name) for name in names)


def read_native_model(folder: str, family: str | None = None,
                      mlp_naming: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the `model` dict of model_config.pt, full HF-named weights) of the native checkpoint in the local `folder`.

    `family`: "internlm", "llama" or "internlm2" (see internevo_layout.py); None reads it off the parameter names.
    `mlp_naming` (see internevo_layout.MLP_NAMINGS): None means v1 for InternLM's names (InternLM's own), v2 for
    InternLM2's (which came after InternEvo's rename), and for LLaMA's names the naming their shapes show (InternEvo's
    LLaMA models used both).
    """
    grid = sorted(tuple(map(int, match.groups())) for name in os.listdir(folder) if (match := MODEL_FILE.match(name)))
    if not grid:
        raise CheckpointError(f"{folder} holds no model_tp*_pp*.pt files: it is not an InternEvo native checkpoint")
    tp, pp = grid[-1][0] + 1, grid[-1][1] + 1
    missing = sorted(set((t, p) for t in range(tp) for p in range(pp)) - set(grid))
    if missing:
        raise CheckpointError(f"{folder} is incomplete: {', '.join(model_file(t, p) for t, p in missing)} missing")
    model_dict = _load(folder, MODEL_CONFIG)
    if model_dict.get("num_chunks", 1) != 1:
        raise CheckpointError(f"{folder}: num_chunks={model_dict['num_chunks']} (interleaved pipeline) is not "
                              "supported")
    files = {(t, p): _load(folder, model_file(t, p)) for t, p in grid}
    family = family or detect_family(files[(0, 0)])
    first_stage = local_names(files[(0, 0)], family)
    if mlp_naming is None:
        mlp_naming = {"internlm": "v1", "internlm2": "v2"}.get(family) or mlp_naming_of_shapes(first_stage, family)
    layout = NativeLayout(tp=tp, pp=pp, num_layers=model_dict["num_layers"], mlp_naming=mlp_naming, family=family,
                          embed_split_hidden=_embedding_splits_hidden(first_stage, family, tp, model_dict),
                          bias=not model_dict.get("no_bias", False), heads=attention_heads(model_dict),
                          qk_interleaved=_qk_interleaved(family, model_dict))
    return model_dict, merge_shards(files, layout, folder)


def attention_heads(model_dict: dict) -> AttentionHeads:
    heads = model_dict["num_attention_heads"]
    return AttentionHeads(heads, model_dict.get("num_kv_attention_heads") or heads, model_dict["hidden_size"] // heads)


def _embedding_splits_hidden(first_stage: dict, family: str, tp: int, model_dict: dict) -> bool:
    """InternLM's names tell; LLaMA's `tok_embeddings.weight` is either ([vocab, hidden/tp] when split over hidden)."""
    if family == "internlm":
        return "embedding.weight" in first_stage
    embedding = first_stage.get("tok_embeddings.weight")
    return tp > 1 and embedding is not None and embedding.shape[1] != model_dict.get("hidden_size")


def _qk_interleaved(family: str, model_dict: dict) -> bool:
    """Whether the q/k rows hold interleaved rotary pairs: InternEvo's newer `qk_interleaved` says so; before it,
    `adapt_hf=True` meant HF's order, which its InternLM2 had by default and its LLaMA did not."""
    if family == "internlm":
        return False
    if "qk_interleaved" in model_dict:
        return bool(model_dict["qk_interleaved"])
    return not model_dict.get("adapt_hf", family == "internlm2")


def write_native_checkpoint(folder: str, weights: dict[str, torch.Tensor], model_dict: dict, layout: NativeLayout,
                            step: int, run_state: dict[str, dict] | None = None) -> None:
    """Write a native checkpoint of full HF-named `weights` at `layout`'s sizes; `run_state` maps CONTEXT, SAMPLER
    and SCHEDULER to their content (see `native_run_state`). The marker comes last."""
    config = config_from_model_dict(model_dict)
    if config.num_attention_heads % layout.tp:
        raise CheckpointError(f"{config.num_attention_heads} attention heads do not split over tp={layout.tp}")
    if layout.family == "internlm" and config.num_key_value_heads != config.num_attention_heads:
        raise CheckpointError(f"InternLM's native layout (a fused Wqkv of as many k and v heads as q heads) has no "
                              f"grouped-query attention, and this model has num_key_value_heads="
                              f"{config.num_key_value_heads} for num_attention_heads={config.num_attention_heads}; "
                              "write it as model type INTERNLM2 (tools/convert2native.py --model_type INTERNLM2)")
    layout = replace(layout, heads=layout.heads or attention_heads(model_dict))
    os.makedirs(folder, exist_ok=True)
    for (t, p), state in shard_weights(weights, layout).items():
        torch.save({name: tensor.to(config.dtype) for name, tensor in state.items()},
                   os.path.join(folder, model_file(t, p)))
        vocab_parallel = p == 0 and not layout.embed_split_hidden
        torch.save({"model.embedding.word_embeddings": {"dim": 0}} if vocab_parallel else {},
                   os.path.join(folder, f"topo_tp{t}_pp{p}.json"))
    saved_model_dict = {**model_dict, "dtype": config.dtype, "embed_split_hidden": layout.embed_split_hidden,
                        "num_chunks": 1, **LAYOUT_KEYS[layout.family](layout)}
    torch.save(saved_model_dict, os.path.join(folder, MODEL_CONFIG))
    for name, content in (run_state or {}).items():
        torch.save(content, os.path.join(folder, name))
    torch.save({"step": step}, os.path.join(folder, f"{step}.step"))


# The model_config.pt keys that tell InternEvo (and `read_native_model`) how a family's q/k/v rows are stored
LAYOUT_KEYS = {
    "internlm": lambda layout: {},
    "internlm2": lambda layout: {"qk_interleaved": layout.qk_interleaved},
    "llama": lambda layout: {"qk_interleaved": layout.qk_interleaved, "adapt_hf": not layout.qk_interleaved,
                             "enable_qkv_fusion": False},
}


def model_dict_from_config(config: InternLMConfig) -> dict:
    """InternEvo's `model` dict for an InternLM config (what model_config.pt holds)."""
    model_dict = {
        "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
        "mlp_ratio": config.intermediate_size / config.hidden_size, "layer_norm_epsilon": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "rope_base": config.rope.base,
        "use_dynamic_ntk_rope": config.rope.type == "dynamic", "dtype": config.dtype, "norm_type": "rmsnorm",
    }
    if config.rope.type in ("linear", "llama3"):  # evods' own key (model_rope), in transformers' spelling
        model_dict["rope_scaling"] = {"rope_type": config.rope.type, "factor": config.rope.factor,
                                      **config.rope.llama3_parameters}
    if config.tie_word_embeddings:
        model_dict["tie_word_embeddings"] = True
    if not config.bias:
        model_dict["no_bias"] = True
    if config.num_key_value_heads != config.num_attention_heads:
        model_dict["num_kv_attention_heads"] = config.num_key_value_heads
    if intermediate_size(config.hidden_size, model_dict["mlp_ratio"]) != config.intermediate_size:
        raise CheckpointError(f"intermediate_size {config.intermediate_size} is not one InternEvo's mlp_ratio can "
                              f"give for hidden_size {config.hidden_size} (a multiple of 256)")
    return model_dict


def native_run_state(context: dict, sampler: dict, schedulers: dict) -> dict[str, dict]:
    """InternEvo's context.pt, sampler.pt and schedulder.pt from evods' TrainState, sampler and schedulers states."""
    native_context = {
        "batch_count": context["batch_count"] - 1,  # InternEvo counts the index of the last batch, evods the batches
        "step_count": context["step_count"], "num_consumed_tokens": context["num_consumed_tokens"],
        "inf_nan_skip_batches": context["inf_nan_skip_batches"],
        "num_consumed_samples_in_epoch": sampler["num_consumed_samples_in_epoch"], "tensorboard_folder": None,
    }
    return {CONTEXT: native_context, SAMPLER: sampler, SCHEDULER: {"last_epoch": schedulers["lr"]["last_epoch"]}}


def evods_context(folder: str) -> dict:
    """evods' TrainState counters from context.pt."""
    context = _load(folder, CONTEXT)
    return {"batch_count": context["batch_count"] + 1, "step_count": context["step_count"],
            "num_consumed_tokens": context["num_consumed_tokens"],
            "inf_nan_skip_batches": context["inf_nan_skip_batches"]}


def evods_schedulers(step_count: int) -> dict:
    """The lr and beta2 schedules resume at the step count, as InternEvo's scheduler reload does."""
    return {"lr": {"last_epoch": step_count}, "beta2": {"cur_iter": step_count}}


def evods_sampler(folder: str) -> dict:
    return _load(folder, SAMPLER)


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing from the InternEvo native checkpoint")
    return load_file(path, NUMPY_ARRAYS)  # InternEvo's sampler.pt holds its numpy RNG state
