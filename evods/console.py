"""What evods' processes print. By default a job speaks once, from its logging rank, and without the lines of
libraries that look like errors but are none; `--verbose` (train_ds.py) or EVODS_VERBOSE=1 (every command) shows
everything, from every rank.

Hidden by default:
- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." on a
  machine without GPUs, where the CPU is what evods trains on;
- FutureWarnings: libraries' notices about their own coming changes, which the user cannot act on;
- sentencepiece's absl lines ("Piece at index 354 is a null character (\\0) and byte_fallback is enabled", about an
  unused piece of InternLM's V7_sft.model);
- on every rank but 0 and the logging rank: anything below an error (they repeat rank 0's lines).
The launchers' own lines (`deepspeed`'s "cmd = ...", launch.py's "Setting CUDA_VISIBLE_DEVICES=...") come before
evods runs: `deepspeed --quiet` hides them (README, "Training").
"""
import logging
import os
import warnings

VERBOSE_VARIABLE = "EVODS_VERBOSE"
_NOT_ERRORS_FROM = {"DeepSpeed": ("Setting accelerator to CPU",)}
ABSL_ERRORS_ONLY = 2  # absl's minimum level: 0 info, 1 warning, 2 error


def is_verbose(environ=os.environ) -> bool:
    return environ.get(VERBOSE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose() -> None:
    """From here on this process, and the processes it starts, print everything."""
    os.environ[VERBOSE_VARIABLE] = "1"


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_libraries() -> None:
    """Unless verbose, hide the library lines listed in the module doc. Before the libraries are imported: a filter
    on DeepSpeed's logger survives the level and handler DeepSpeed gives it when it starts."""
    if is_verbose():
        return
    for name, starts in _NOT_ERRORS_FROM.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropLines) for existing in logger.filters):
            logger.addFilter(_DropLines(starts))
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_sentencepiece()


def quiet_sentencepiece() -> None:
    """sentencepiece's absl warnings off (unless verbose); per process, so that tokenizer workers call it too."""
    if not is_verbose():
        import sentencepiece

        sentencepiece.set_min_log_level(ABSL_ERRORS_ONLY)


def log_level(rank: int) -> int:
    """The root logger's level on `rank`: rank 0 speaks (INFO); the others only on an error, unless verbose. The
    logging rank of a pipeline (the last stage) raises evods' own logger to INFO itself (trainer.py)."""
    return logging.INFO if rank == 0 or is_verbose() else logging.ERROR
