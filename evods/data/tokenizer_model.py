"""The SentencePiece tokenizer of training text: which model file (the given one, else InternLM's V7_sft.model that
ships with evods), loading it with a one-line error, and whether a model's embedding has room for its ids."""
from pathlib import Path

import sentencepiece as spm

from evods.console import quiet_sentencepiece
from evods.data.errors import DataError

# tools/V7_sft.model, reached through a link beside this module so that it ships inside the package (pip install .)
DEFAULT_TOKENIZER_PATHS = (Path(__file__).with_name("V7_sft.model"),)
TOKENIZER_SOURCE = ("InternLM's V7_sft.model, from the tools/ folder of https://github.com/InternLM/InternLM "
                    "(commit fa7337b, sha256 aab622d9...)")


def find_tokenizer(path=None) -> Path:
    """The given SentencePiece model, else the first of DEFAULT_TOKENIZER_PATHS that exists."""
    if path is not None:
        if not Path(path).is_file():
            raise DataError(f"tokenizer model {path} not found; evods needs {TOKENIZER_SOURCE}")
        return Path(path)
    for candidate in DEFAULT_TOKENIZER_PATHS:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(p) for p in DEFAULT_TOKENIZER_PATHS)
    raise DataError(f"no tokenizer model: put {TOKENIZER_SOURCE} at {tried}, or pass --tokenizer_path")


def load_tokenizer(path) -> spm.SentencePieceProcessor:
    quiet_sentencepiece()
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path} is not a SentencePiece model: {err}") from None


def check_tokenizer_fits(tokenizer_path, vocab_size: int, model_name: str = "the model") -> None:
    """A tokenizer with more ids than the model's embedding rows would index past it on its first rare token."""
    tokenizer_vocab = load_tokenizer(find_tokenizer(tokenizer_path)).vocab_size()
    if tokenizer_vocab > vocab_size:
        raise DataError(f"the tokenizer {find_tokenizer(tokenizer_path)} has {tokenizer_vocab} ids but {model_name} "
                        f"has vocab_size={vocab_size}; use the model's tokenizer or a model with vocab_size >= "
                        f"{tokenizer_vocab}")
