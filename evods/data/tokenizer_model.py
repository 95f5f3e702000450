"""The tokenizer of training text: which one (the given one, else InternLM's V7_sft.model that ships with evods),
loading it with a one-line error, and whether a model's embedding has room for its ids.

A tokenizer is a SentencePiece model file, or a Hugging Face tokenizer: a folder with tokenizer.json (a tokenizer or
model folder, e.g. Llama-3's) or the tokenizer.json file itself, read from disk only. Both load as an object with
SentencePiece's calls that the data tools use (`encode`, `vocab_size`, `bos_id`, `eos_id`, `piece_to_id`, `unk_id`),
so the bin/meta they write has one format whichever tokenizer made it.
"""
import hashlib
from pathlib import Path

import sentencepiece as spm

from evods.console import quiet_sentencepiece
from evods.data.errors import DataError

# tools/V7_sft.model, reached through a link beside this module so that it ships inside the package (pip install .)
DEFAULT_TOKENIZER_PATHS = (Path(__file__).with_name("V7_sft.model"),)
TOKENIZER_SOURCE = ("InternLM's V7_sft.model, from the tools/ folder of https://github.com/InternLM/InternLM "
                    "(commit fa7337b, sha256 aab622d9...)")
HF_TOKENIZER_FILE = "tokenizer.json"
# what else of a Hugging Face tokenizer folder decides its ids (special tokens, BOS/EOS): the fingerprint reads them
HF_TOKENIZER_FILES = (HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def find_tokenizer(path=None) -> Path:
    """The given SentencePiece model, Hugging Face tokenizer folder or tokenizer.json, else the first of
    DEFAULT_TOKENIZER_PATHS that exists."""
    if path is not None:
        path = Path(path)
        if path.is_dir() and not (path / HF_TOKENIZER_FILE).is_file():
            raise DataError(f"tokenizer folder {path} has no {HF_TOKENIZER_FILE}; give a Hugging Face tokenizer or "
                            "model folder, its tokenizer.json, or a SentencePiece model file")
        if not path.exists():
            raise DataError(f"tokenizer {path} not found; give a SentencePiece model file, a Hugging Face tokenizer "
                            f"folder or its tokenizer.json (evods' default is {TOKENIZER_SOURCE})")
        return path
    for candidate in DEFAULT_TOKENIZER_PATHS:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(p) for p in DEFAULT_TOKENIZER_PATHS)
    raise DataError(f"no tokenizer model: put {TOKENIZER_SOURCE} at {tried}, or pass --tokenizer_path")


def is_hf_tokenizer(path) -> bool:
    """A folder or a .json file: a Hugging Face tokenizer; else a SentencePiece model file."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".json"


class HFTokenizer:
    """A Hugging Face fast tokenizer behind the SentencePiece calls of the data tools.

    As with SentencePiece, `encode` gives the text's own tokens, and `add_bos`/`add_eos` add BOS/EOS: those the
    tokenizer defines (its bos_token and eos_token). `--add_bos` thus gives what `AutoTokenizer(text)` gives for a
    tokenizer that adds its BOS, as Llama-3's does."""

    def __init__(self, tokenizer, source: Path):
        self.tokenizer = tokenizer
        self.source = source

    def encode(self, texts, add_bos: bool = False, add_eos: bool = False, num_threads: int = 1):
        """Token ids of one text, or a list of id lists of a list of texts (the Rust tokenizer batches them)."""
        if isinstance(texts, str):
            return self.encode([texts], add_bos, add_eos)[0]
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        before = [self._special_id("bos", "--add_bos")] if add_bos else []
        after = [self._special_id("eos", "--add_eos")] if add_eos else []
        return [before + text_ids + after for text_ids in ids]

    def _special_id(self, name: str, option: str) -> int:
        token_id = getattr(self.tokenizer, f"{name}_token_id")
        if token_id is None:
            raise DataError(f"{option}: the tokenizer {self.source} defines no {name}_token (tokenizer_config.json); "
                            f"leave {option} out or give a tokenizer that has one")
        return token_id

    def vocab_size(self) -> int:
        """Every id the tokenizer can give, added special tokens included."""
        return len(self.tokenizer)

    def bos_id(self) -> int:
        return self._special_id("bos", "BOS")

    def eos_id(self) -> int:
        return self._special_id("eos", "EOS")

    def unk_id(self) -> int:
        return -1 if self.tokenizer.unk_token_id is None else self.tokenizer.unk_token_id

    def piece_to_id(self, piece: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(piece)
        return self.unk_id() if token_id is None else token_id


def load_tokenizer(path) -> "spm.SentencePieceProcessor | HFTokenizer":
    path = Path(path)
    if is_hf_tokenizer(path):
        return load_hf_tokenizer(path)
    quiet_sentencepiece()
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path} is not a SentencePiece model ({err}); give a SentencePiece model file, a Hugging "
                        "Face tokenizer folder or its tokenizer.json") from None


def hf_tokenizer_folder(path: Path) -> Path | None:
    """The folder a Hugging Face tokenizer loads from: the folder given, or that of a tokenizer.json beside a
    tokenizer_config.json (which names BOS/EOS); None for a lone tokenizer file."""
    if path.is_dir():
        return path
    beside_config = path.name == HF_TOKENIZER_FILE and (path.parent / "tokenizer_config.json").is_file()
    return path.parent if beside_config else None


def load_hf_tokenizer(path: Path) -> HFTokenizer:
    """A folder with `AutoTokenizer`, a lone tokenizer file with `PreTrainedTokenizerFast`; local files only."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = hf_tokenizer_folder(path)
    try:
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
        else:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as err:  # tokenizers and transformers raise many types for an unreadable tokenizer
        raise DataError(f"{path} is not a Hugging Face tokenizer: {str(err).splitlines()[0] if str(err) else err!r}"
                        ) from None
    if not tokenizer.is_fast:
        raise DataError(f"{path}: only a fast tokenizer (tokenizer.json) is read; this folder gives "
                        f"{type(tokenizer).__name__}")
    return HFTokenizer(tokenizer, path)


def tokenizer_fingerprint(path) -> str:
    """sha256 of what a tokenizer's ids depend on: the SentencePiece model file, or the Hugging Face tokenizer's
    files."""
    path = Path(path)
    digest = hashlib.sha256()
    folder = hf_tokenizer_folder(path)
    if folder is not None:
        for name in HF_TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_tokenizer_fits(tokenizer_path, vocab_size: int, model_name: str = "the model") -> None:
    """A tokenizer with more ids than the model's embedding rows would index past it on its first rare token."""
    tokenizer_vocab = load_tokenizer(find_tokenizer(tokenizer_path)).vocab_size()
    if tokenizer_vocab > vocab_size:
        raise DataError(f"the tokenizer {find_tokenizer(tokenizer_path)} has {tokenizer_vocab} ids but {model_name} "
                        f"has vocab_size={vocab_size}; use the model's tokenizer or a model with vocab_size >= "
                        f"{tokenizer_vocab}")
