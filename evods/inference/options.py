"""What the inference tools accept, and how they refuse: plain data without torch or transformers, so that a command
prints its `--help` (or a mistake in its options) at once."""

ROTARY_TYPES = ("dynamic", "origin")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


class InferenceError(ValueError):
    """A folder, option or prompt the inference tools cannot use; the message says what to do."""
