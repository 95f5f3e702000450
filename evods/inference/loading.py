"""Loading an InternLM Hugging Face folder (an evods export, a published InternLM v1 model or one of InternLM's
published InternLM2 layout) for inference, with one line that says what to do when the folder cannot serve."""
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evods.model import InternLM2Config  # importing evods.model registers InternLM with the Auto classes
from evods.model.chat_templates import CHAT_TEMPLATES, chat_template_named, check_tokenizer

from .options import DTYPE_NAMES, ROTARY_TYPES, InferenceError

# config.json's model_type of evods' own layout and of InternLM's published InternLM2 layout; published InternLM2
# folders may say "internlm" too, and their `architectures` tells
INTERNLM_MODEL_TYPES = ("internlm", "internlm2")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
MAX_LENGTH_UNCHECKED = 10**9


def pick_device(device: str = "auto") -> torch.device:
    """CUDA when there is one, else the CPU; or the device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, folder_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": the folder's dtype on CUDA; float32 on the CPU, where half-precision matmuls are slow (fp16: very)."""
    if dtype == "auto":
        return (folder_dtype or torch.float32) if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_folder_config(folder: Path) -> dict:
    """config.json of a Hugging Face folder, or an InferenceError that says what is wrong with the folder."""
    if not folder.is_dir():
        raise InferenceError(f"--model {folder}: no such folder (give a folder written by tools/convert2hf.py)")
    if not (folder / "config.json").is_file():
        raise InferenceError(f"--model {folder}: no config.json here; give a Hugging Face folder written by "
                             "tools/convert2hf.py, or an InternLM model folder")
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def check_folder(folder: Path) -> dict:
    """config.json of an InternLM folder, or an InferenceError that says what is wrong with the folder."""
    config = read_folder_config(folder)
    if config.get("model_type") not in INTERNLM_MODEL_TYPES:
        raise InferenceError(f"--model {folder} holds a {config.get('model_type')!r} model; this tool runs InternLM "
                             "folders (tools/convert2hf.py without --format llama)")
    return config


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InferenceError(f"--model {folder} has no tokenizer; convert with --tokenizer tools/V7_sft.model, or copy "
                             "the model's tokenizer files (tokenizer.model, tokenizer_config.json) into it")
    config_file = folder / "tokenizer_config.json"
    remote = config_file.is_file() and "auto_map" in json.loads(config_file.read_text(encoding="utf-8"))
    if remote and not trust_remote_code:  # InternLM's published folders: tokenization_internlm.py
        raise InferenceError(f"--model {folder}: its tokenizer is code shipped in the folder; pass "
                             "--trust_remote_code to run it")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # model_max_length is max_position_embeddings, which dynamic NTK goes past: the tools decide on the context
    tokenizer.model_max_length = MAX_LENGTH_UNCHECKED
    return tokenizer


def load_for_inference(folder: str | Path, rotary_type: str | None = None, dtype: str = "auto",
                       device: str = "auto", trust_remote_code: bool = False, chat_template: str | None = None):
    """(evods' InternLMForCausalLM in eval mode on `device`, the folder's tokenizer). `rotary_type` replaces the
    folder's ("dynamic" or "origin") and `chat_template` its chat format (a name of evods.model.chat_templates),
    without editing config.json."""
    folder = Path(folder)
    check_folder(folder)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    if rotary_type is not None and rotary_type not in ROTARY_TYPES:
        raise InferenceError(f"--rotary_type {rotary_type!r}: use one of {ROTARY_TYPES}")
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise InferenceError(f"--chat_template {chat_template!r}: use one of {', '.join(CHAT_TEMPLATES)}")
    config = folder_config(folder)
    if rotary_type is not None:
        if config.rope.type not in ROTARY_TYPES:  # linear, llama3: the frequencies are scaled, not only the base
            raise InferenceError(f"--rotary_type {rotary_type}: {folder} has RoPE type {config.rope.type!r}, which "
                                 "only its own scaling computes; leave --rotary_type out")
        config.rotary = {**config.rotary, "type": rotary_type}
        config.derive_rope_keys()
    config.chat_template = chat_template or config.chat_template
    try:
        check_tokenizer(chat_template_named(config.chat_template), tokenizer, f"the tokenizer of {folder}")
    except ValueError as error:
        raise InferenceError(f"--model {folder}: {error}") from None
    return load_model(folder, config, dtype, device), tokenizer


def folder_config(folder: Path):
    """The folder's config as evods' class for its layout: InternLM2's published one by `architectures` (early
    published InternLM2 folders say "model_type": "internlm"), else by model_type."""
    if "InternLM2ForCausalLM" in (read_folder_config(folder).get("architectures") or ()):
        return InternLM2Config.from_pretrained(folder)
    return AutoConfig.from_pretrained(folder)


def load_model(folder: Path, config, dtype: str, device: str):
    target = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=pick_dtype(dtype, config.dtype, target))
    return model.to(target).eval()


def load_for_serving(folder: str | Path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(the causal LM of a folder evods exports, InternLM or Llama layout, in eval mode on `device`; its tokenizer)."""
    folder = Path(folder)
    read_folder_config(folder)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    return load_model(folder, folder_config(folder), dtype, device), tokenizer


def uses_dynamic_ntk(config) -> bool:
    """Whether the model rescales RoPE past max_position_embeddings: InternLM's `rotary`, or the Llama schemas' keys."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rotary = getattr(config, "rotary", None) or {}
    return rotary.get("type", rope.get("rope_type", rope.get("type"))) == "dynamic"


def context_limit(config, max_context: int | None) -> int:
    """Tokens of prompt and reply together: with dynamic NTK RoPE `max_context`, by default 4 x
    max_position_embeddings (it degrades gracefully past its training length); otherwise max_position_embeddings."""
    if not uses_dynamic_ntk(config):
        return config.max_position_embeddings
    return max_context or 4 * config.max_position_embeddings
