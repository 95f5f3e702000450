"""Tiny random InternLM folders with the real tokenizer, as tools/convert2hf.py writes them, for the inference tests
(chat, streaming, the terminal chat, the web demo, the long-context evaluation)."""
from pathlib import Path

import torch

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
    return folder
