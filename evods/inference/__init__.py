"""Inference on exported Hugging Face folders: loading them for chat and serving, fitting a conversation into the
context, showing replies, measuring perplexity by position, and the OpenAI-compatible server (tools/chat.py,
tools/web_demo.py, tools/eval_long_context.py, tools/serve.py; the server is evods.inference.server, imported only by
the last).

`load_for_inference` is imported on first use: it needs torch and transformers, which the commands import only once
their options are parsed."""
from .context import ContextError, Turn, fit_turn
from .options import DTYPE_NAMES, ROTARY_TYPES, InferenceError

__all__ = ["ContextError", "DTYPE_NAMES", "InferenceError", "ROTARY_TYPES", "Turn", "fit_turn", "load_for_inference"]


def __getattr__(name: str):
    if name == "load_for_inference":
        from .loading import load_for_inference

        return load_for_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
