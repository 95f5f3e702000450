"""Tiny random InternLM folders with the real tokenizer, as tools/convert2hf.py writes them, for the inference tests
(chat, streaming, the terminal chat, the web demo, the long-context evaluation, the server) and the export tests."""
from pathlib import Path

import torch

from evods.checkpoint.formats.hf import write_generation_config
from evods.checkpoint.formats.hf_tokenizer import write_tokenizer
from evods.model import InternLMConfig, InternLMForCausalLM
from testkit.paths import TOKENIZER

# The tokenizer's vocabulary, so that text round-trips; small layers, so that a token takes milliseconds.
TINY = dict(vocab_size=103168, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rotary={"base": 10000, "type": "dynamic"})


def tiny_model(seed: int = 0, **overrides) -> InternLMForCausalLM:
    torch.manual_seed(seed)
    return InternLMForCausalLM(InternLMConfig(**{**TINY, **overrides})).eval()


def tiny_chat_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """An HF folder (weights, config, InternLM's tokenizer files with the chat template) of a random tiny model."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(folder)
    write_tokenizer(str(TOKENIZER), str(folder), model.config.max_position_embeddings)
    write_generation_config(str(folder))
    return folder


def tiny_export(root: Path, model_dict: dict, *convert2hf_args: str, seed: int = 0, name: str = "hf") -> Path:
    """root/`name`: tools/convert2hf.py's folder (with the tokenizer) of a random tiny InternLM written as an InternEvo
    native checkpoint (root/native, tensor-parallel 2, made on the first call) with InternEvo's `model` dict
    `model_dict`. The weights are large enough (std 0.3) that logits differ clearly between tokens."""
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout
    from evods.model import config_from_model_dict
    from tools.convert2hf import main as convert2hf

    if not (root / "native").exists():
        torch.manual_seed(seed)
        model = InternLMForCausalLM(config_from_model_dict(model_dict))
        with torch.no_grad():
            for parameter_name, param in model.named_parameters():
                param.normal_(1.0 if "norm" in parameter_name else 0.0, 0.3)
        write_native_checkpoint(str(root / "native"), model.state_dict(), model_dict,
                                NativeLayout(tp=2, pp=1, num_layers=model_dict["num_layers"]), step=1)
    code = convert2hf(["--src", str(root / "native"), "--tgt", str(root / name), "--tokenizer", str(TOKENIZER),
                       *convert2hf_args])
    assert code == 0, f"convert2hf exited with {code}"
    return root / name
