"""The tokenizer files of an exported HF folder, with the model's chat template (evods.model.chat_templates), read the
same way by `AutoTokenizer` slow and fast on transformers 4.36 to 5.x. The source is a SentencePiece model
(InternLM's V7_sft.model, InternLM2's tokenizer_internlm2.model) or a folder of Hugging Face tokenizer files
(tokenizer.json; e.g. a Llama-3 tokenizer).

From a SentencePiece model (its ids, BOS first, no added "▁" prefix unless the model adds one, InternLM's
`<eoh>`/`<eoa>` as single pieces):
    tokenizer.model          the SentencePiece model, as InternLM's folders carry it (read by the slow tokenizer)
    tokenizer.json           the fast tokenizer, in a form every `tokenizers` from 0.15 on reads
    tokenizer_config.json    LlamaTokenizer, BOS added, pad = EOS, the chat template, InternLM2's named chat tokens
    special_tokens_map.json
From a tokenizer folder: its tokenizer.json (in the same portable form), tokenizer_config.json with the chat
template, and its other tokenizer files.

Why tokenizer.json: without it, transformers 4.36 builds the fast tokenizer from the SentencePiece model with a
converter that always prepends "▁", which InternLM's model does not (`add_dummy_prefix=false`), so every first word
gets a wrong id. transformers' own converter (as of 5.x) builds the right one; it is written down in the oldest JSON
form so that older `tokenizers` read it as well.

Converting a SentencePiece model takes seconds (transformers rebuilds the BPE merges in Python), and the data tools
run once per input file: the converted tokenizer.json is kept in a cache (`tokenizer_cache_dir`), keyed by the
model's bytes and the library versions, so each SentencePiece model converts once per machine.

tools/chat_tokenizer.py tokenizes training conversations with the tokenizer these files make (`write_tokenizer`
into a folder of its own), so the data and the exported folder's `apply_chat_template` give the same ids.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from evods.model.chat_templates import ChatTemplate, check_tokenizer

from ..errors import CheckpointError

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
# InternLM2's tokenizer.model keeps its chat and tool tokens as user-defined pieces [UNUSED_TOKEN_141..146]; its
# published HF folders add them under these names (ids 92538-92543, InternLM's chat/chat_format.md).
PIECE_NAMES = {"[UNUSED_TOKEN_141]": "<|plugin|>", "[UNUSED_TOKEN_142]": "<|interpreter|>",
               "[UNUSED_TOKEN_143]": "<|action_end|>", "[UNUSED_TOKEN_144]": "<|action_start|>",
               "[UNUSED_TOKEN_145]": "<|im_end|>", "[UNUSED_TOKEN_146]": "<|im_start|>"}
CACHE_ENV = "EVODS_CACHE_DIR"  # where converted tokenizers are kept; empty: no cache
# bump when the conversion below changes what it writes, so that older cache entries are not used
CONVERSION_VERSION = 1
# the files of a tokenizer folder that travel; chat_template.jinja does not (the model's template replaces it)
TOKENIZER_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def write_tokenizer(source: str, tgt: str, max_length: int, template: ChatTemplate | None):
    """Write the tokenizer files of `source` (a SentencePiece model or a tokenizer folder) with `template` as the chat
    template into the folder `tgt`, and return the fast tokenizer they make. CheckpointError when `source` cannot be
    read or cannot encode the template's special tokens (the folder then holds files to discard). `template` None:
    no chat template is checked or written (a tokenizer folder keeps its own)."""
    from transformers import AutoTokenizer

    check_tokenizer_source(source)
    jinja = template.jinja if template is not None else None
    if os.path.isdir(source):
        _write_from_folder(source, tgt, max_length, jinja)
    else:
        _write_from_sentencepiece(source, tgt, max_length, jinja)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tgt, use_fast=True, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"--tokenizer {source}: transformers cannot read it as a tokenizer "
                              f"({str(error).splitlines()[0]})") from None
    if template is not None:
        try:
            check_tokenizer(template, tokenizer, f"the tokenizer {source}")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    return tokenizer


def check_tokenizer_source(source: str) -> None:
    """A SentencePiece model file or a folder with tokenizer.json, else a CheckpointError that says what to give."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise CheckpointError(f"--tokenizer {source}: a tokenizer folder needs a tokenizer.json (Hugging Face's "
                                  "fast tokenizer file); or give a SentencePiece .model file")
    else:
        _read_sentencepiece(source)


def _write_from_sentencepiece(sentencepiece_model: str, tgt: str, max_length: int, chat_template: str | None) -> None:
    proto = _read_sentencepiece(sentencepiece_model)
    shutil.copyfile(sentencepiece_model, os.path.join(tgt, "tokenizer.model"))
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        # transformers >= 4.38 builds its fast Llama tokenizer from this instead of tokenizer.json when it is set;
        # transformers 5 needs it to not prepend "▁" (it rebuilds the pre-tokenizer from the class).
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length,
        **({"chat_template": chat_template} if chat_template is not None else {}), **SPECIAL_TOKENS,
    }
    _write_json(os.path.join(tgt, "special_tokens_map.json"), SPECIAL_TOKENS, indent=2)
    _write_json(os.path.join(tgt, "tokenizer_config.json"), tokenizer_config, indent=2)
    named = {i: PIECE_NAMES[piece.piece] for i, piece in enumerate(proto.pieces) if piece.piece in PIECE_NAMES}
    if named:
        # The names replace the pieces at the same ids, in the fast tokenizer's vocabulary and added tokens and in
        # tokenizer_config's added_tokens_decoder (read by the slow tokenizer); a name only in added_tokens_decoder
        # would get a new id past the vocabulary.
        tokenizer_config["added_tokens_decoder"] = {
            str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for i, name in named.items()}
        _write_json(os.path.join(tgt, "tokenizer_config.json"), tokenizer_config, indent=2)

    def convert() -> str:
        fast = _fast_tokenizer_json(tgt)
        return json.dumps(portable_tokenizer_json(_rename_pieces(fast, named) if named else fast), ensure_ascii=False)

    with open(os.path.join(tgt, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_cached_conversion(sentencepiece_model, convert))


def tokenizer_cache_dir() -> Path | None:
    """Where converted tokenizers are kept: $EVODS_CACHE_DIR/tokenizers (no cache when it is set empty), else
    $XDG_CACHE_HOME/evods/tokenizers or ~/.cache/evods/tokenizers."""
    root = os.environ.get(CACHE_ENV)
    if root == "":
        return None
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evods")
    return Path(root) / "tokenizers"


def _cached_conversion(sentencepiece_model: str, convert) -> str:
    """`convert()`'s tokenizer.json for this SentencePiece model, from the cache when an entry for the same model bytes
    and library versions is there. The cache only saves time: an unreadable or unwritable cache is passed by."""
    import tokenizers
    import transformers

    folder = tokenizer_cache_dir()
    if folder is None:
        return convert()
    digest = hashlib.sha256(Path(sentencepiece_model).read_bytes())
    digest.update(f"{CONVERSION_VERSION} {transformers.__version__} {tokenizers.__version__}".encode())
    entry = folder / f"{digest.hexdigest()}.json"
    try:
        return entry.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # no entry yet, or one that cannot be read
        pass
    text = convert()
    part = entry.with_suffix(f".{os.getpid()}.part")
    try:  # written whole, then renamed: a reader never sees half an entry
        folder.mkdir(parents=True, exist_ok=True)
        part.write_text(text, encoding="utf-8")
        os.replace(part, entry)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink()
    return text


def _rename_pieces(tokenizer: dict, names: dict[int, str]) -> dict:
    """The fast tokenizer JSON with the pieces of the ids in `names` renamed, as special added tokens."""
    model = dict(tokenizer["model"])
    model["vocab"] = {names.get(i, piece): i for piece, i in model["vocab"].items()}
    added = {token["id"]: token for token in tokenizer["added_tokens"]}
    for i, name in names.items():
        added[i] = {**added.get(i, {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}),
                    "id": i, "content": name, "special": True}
    return {**tokenizer, "model": model, "added_tokens": sorted(added.values(), key=lambda token: token["id"])}


def _write_from_folder(folder: str, tgt: str, max_length: int, chat_template: str | None) -> None:
    config_file = os.path.join(folder, "tokenizer_config.json")
    tokenizer_config = _read_json(config_file) if os.path.isfile(config_file) else {}
    own_template = os.path.join(folder, "chat_template.jinja")  # where transformers >= 4.43 saves it
    if chat_template is None and "chat_template" not in tokenizer_config and os.path.isfile(own_template):
        with open(own_template, encoding="utf-8") as f:
            chat_template = f.read()
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config["model_max_length"] = max_length
    for name in ("special_tokens_map.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(tgt, name))
    _write_json(os.path.join(tgt, "tokenizer_config.json"), tokenizer_config, indent=2)
    _write_json(os.path.join(tgt, "tokenizer.json"),
                portable_tokenizer_json(_read_json(os.path.join(folder, "tokenizer.json"))))


def copy_tokenizer_files(src: str, tgt: str) -> None:
    """The tokenizer files `write_tokenizer` wrote into `src`, copied into `tgt`."""
    for name in TOKENIZER_FOLDER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(tgt, name))


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, content, indent=None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(content, indent=indent, ensure_ascii=False))  # one C call; json.dump encodes in Python


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
    if any(" " in piece for pair in model["merges"] for piece in _merge_pair(pair)):
        raise CheckpointError("the tokenizer has merges of pieces with spaces, which older tokenizers cannot read")
    model["merges"] = [" ".join(_merge_pair(pair)) for pair in model["merges"]]
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


def _merge_pair(merge) -> list[str]:
    """A BPE merge as its two pieces, from either JSON form (["a", "b"], or "a b" as older `tokenizers` write it)."""
    return merge.split(" ") if isinstance(merge, str) else merge


def _read_sentencepiece(sentencepiece_model: str):
    """The ModelProto of a SentencePiece model file; reading it checks that the file is one, so exports call it
    before they write anything."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(sentencepiece_model):
        raise CheckpointError(f"--tokenizer {sentencepiece_model}: no such file or folder (give a SentencePiece .model "
                              "file, e.g. tools/V7_sft.model, or a folder with tokenizer.json)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(sentencepiece_model, "rb") as f:
            proto.ParseFromString(f.read())
    except DecodeError:
        raise CheckpointError(f"--tokenizer {sentencepiece_model} is not a SentencePiece model file") from None
    return proto

