"""A checkpoint (evods, or native at other sizes) as an InternEvo native checkpoint at any tensor/pipeline size."""
from evods.storage import open_storage

from .. import layout
from ..errors import CheckpointError
from ..run_state import from_bytes
from . import check_output_folder
from .checkpoint_model import read_checkpoint_model
from .internevo import model_dict_from_config, native_run_state, write_native_checkpoint
from .internevo_layout import AttentionHeads, NativeLayout

# InternEvo's model types and the layout of their native files (internevo_layout.py): InternLM3 is InternEvo's
# InternLM2 class with enable_qkv_fusion=False, which stores q, k and v apart under the llama family's names, as its
# LLAMA2 does
NATIVE_MODEL_TYPES = {"INTERNLM": "internlm", "INTERNLM2": "internlm2", "INTERNLM3": "llama", "LLAMA2": "llama"}


def export_native(src: str, tgt: str, tp: int = 1, pp: int = 1, mlp_naming: str | None = None,
                  embed_split_hidden: bool = False, src_mlp_naming: str | None = None,
                  model_type: str | None = None, base: str | None = None) -> None:
    """Write the model of checkpoint `src` to the local folder `tgt` as model_tp{t}_pp{p}.pt files, with
    model_config.pt and the marker; an evods source also gives context.pt, sampler.pt and schedulder.pt.
    `model_type` (NATIVE_MODEL_TYPES) chooses the layout; None: INTERNLM for a multi-head model, else INTERNLM2.
    `mlp_naming` (v1, v2): None means v1 for INTERNLM and v2 (the only one InternEvo's InternLM2 class knows) else.
    A LoRA run's checkpoint is written merged into `base`, the model it trained on (native files hold no adapters)."""
    if tp < 1 or pp < 1:
        raise CheckpointError(f"tp={tp}, pp={pp}: both must be at least 1")
    if model_type is not None and model_type not in NATIVE_MODEL_TYPES:
        raise CheckpointError(f"--model_type {model_type!r}: use one of {tuple(NATIVE_MODEL_TYPES)}")
    check_output_folder(tgt, "--tgt")
    config, weights = read_checkpoint_model(src, src_mlp_naming, base)
    if model_type is None:
        model_type = "INTERNLM" if config.num_key_value_heads == config.num_attention_heads else "INTERNLM2"
    family = NATIVE_MODEL_TYPES[model_type]
    native_layout = NativeLayout(tp=tp, pp=pp, num_layers=config.num_hidden_layers,
                                 embed_split_hidden=embed_split_hidden, family=family, bias=config.bias,
                                 heads=AttentionHeads(config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim),
                                 mlp_naming=mlp_naming or ("v1" if family == "internlm" else "v2"))
    step, run_state = _evods_run_state(src)
    write_native_checkpoint(tgt, weights, model_dict_from_config(config), native_layout, step, run_state)


def _evods_run_state(src: str) -> tuple[int, dict | None]:
    """(step, native run-state files) of an evods checkpoint; (0, None) for a native source, whose model alone is
    converted."""
    storage = open_storage(src)
    step = layout.marked_step(storage, "")
    if step is None or not storage.exists(layout.CONTEXT):
        return step or 0, None
    context, sampler, schedulers = (from_bytes(storage.read_bytes(name), storage.uri(name))
                                    for name in (layout.CONTEXT, layout.SAMPLER, layout.SCHEDULERS))
    return step, native_run_state(context, sampler, schedulers)
