"""The tokenizer files of an exported HF folder: InternLM's SentencePiece model, read the same way (its ids, BOS first,
no added prefix space, `<eoh>`/`<eoa>` as single pieces) by `AutoTokenizer` slow and fast on transformers 4.36 to 5.x,
with InternLM's chat format as the chat template.

    tokenizer.model          the SentencePiece model, as InternLM's folders carry it (read by the slow tokenizer)
    tokenizer.json           the fast tokenizer, in a form every `tokenizers` from 0.15 on reads
    tokenizer_config.json    LlamaTokenizer, BOS added, pad = EOS, the chat template
    special_tokens_map.json

Why tokenizer.json: without it, transformers 4.36 builds the fast tokenizer from the SentencePiece model with a
converter that always prepends "▁", which InternLM's model does not (`add_dummy_prefix=false`), so every first word
gets a wrong id. transformers' own converter (as of 5.x) builds the right one; it is written down in the oldest JSON
form so that older `tokenizers` read it as well.
"""
import json
import os
import shutil
import tempfile

from evods.model.modeling_internlm import CHAT_TEMPLATE  # InternLM's chat format, as the model's `chat` renders it

from ..errors import CheckpointError

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}


def write_tokenizer(sentencepiece_model: str, tgt: str, max_length: int) -> None:
    add_dummy_prefix = sentencepiece_adds_dummy_prefix(sentencepiece_model)
    shutil.copyfile(sentencepiece_model, os.path.join(tgt, "tokenizer.model"))
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        # transformers >= 4.38 builds its fast Llama tokenizer from this instead of tokenizer.json when it is set;
        # transformers 5 needs it to not prepend "▁" (it rebuilds the pre-tokenizer from the class).
        "add_prefix_space": add_dummy_prefix,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length, "chat_template": CHAT_TEMPLATE,
        **SPECIAL_TOKENS,
    }
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", SPECIAL_TOKENS)):
        with open(os.path.join(tgt, name), "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    with open(os.path.join(tgt, "tokenizer.json"), "w") as f:
        json.dump(portable_tokenizer_json(_fast_tokenizer_json(tgt)), f, ensure_ascii=False)


def _fast_tokenizer_json(folder: str) -> dict:
    """transformers' fast tokenizer of the folder's tokenizer.model and tokenizer_config.json, as JSON."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as temp:  # only the SentencePiece files: not a tokenizer.json of an earlier run
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(os.path.join(folder, name), os.path.join(temp, name))
        tokenizer = AutoTokenizer.from_pretrained(temp, use_fast=True)
        return json.loads(tokenizer.backend_tokenizer.to_str())


def portable_tokenizer_json(tokenizer: dict) -> dict:
    """The same tokenizer in the JSON that `tokenizers` 0.15 (transformers 4.36) reads too: BPE merges as "a b"
    strings instead of pairs, and the Metaspace pre-tokenizer (whose newer fields 0.15 rejects) as the equivalent
    normalizer, which replaces spaces with "▁" (and prepends one where the SentencePiece model adds a dummy prefix)."""
    tokenizer = dict(tokenizer)
    model = dict(tokenizer["model"])
    if any(" " in piece for pair in model["merges"] for piece in pair):
        raise CheckpointError("the tokenizer has merges of pieces with spaces, which older tokenizers cannot read")
    model["merges"] = [" ".join(pair) for pair in model["merges"]]
    tokenizer["model"] = model
    pre_tokenizer = tokenizer.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "Metaspace":
        if tokenizer.get("normalizer") is not None or pre_tokenizer.get("split", False):
            raise CheckpointError(f"a tokenizer with {tokenizer.get('normalizer')} and {pre_tokenizer} is not one "
                                  "that converts from a SentencePiece BPE model")
        replacement = pre_tokenizer["replacement"]
        replace_spaces = {"type": "Replace", "pattern": {"String": " "}, "content": replacement}
        prepends = pre_tokenizer.get("prepend_scheme") != "never"
        prepend = [{"type": "Prepend", "prepend": replacement}] if prepends else []
        tokenizer["normalizer"] = {"type": "Sequence", "normalizers": [*prepend, replace_spaces]}
        tokenizer["pre_tokenizer"] = None
    return tokenizer


def sentencepiece_adds_dummy_prefix(sentencepiece_model: str) -> bool:
    """Whether SentencePiece prepends "▁" to the text (V7_sft.model does not), which HF must do the same; reading it
    also checks that the file is a SentencePiece model, so exports call it before they write anything."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(sentencepiece_model):
        raise CheckpointError(f"--tokenizer {sentencepiece_model}: no such file (give a SentencePiece .model file, "
                              "e.g. tools/V7_sft.model)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(sentencepiece_model, "rb") as f:
            proto.ParseFromString(f.read())
    except DecodeError:
        raise CheckpointError(f"--tokenizer {sentencepiece_model} is not a SentencePiece model file") from None
    return proto.normalizer_spec.add_dummy_prefix
