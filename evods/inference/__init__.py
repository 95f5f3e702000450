"""Inference on exported Hugging Face folders: loading them for chat and serving, fitting a conversation into the
context, measuring perplexity by position, and the OpenAI-compatible server (tools/chat.py, tools/web_demo.py,
tools/eval_long_context.py, tools/serve.py; the server is evods.inference.server, imported only by the last)."""
from .context import ContextError, Turn, fit_turn
from .loading import ROTARY_TYPES, InferenceError, load_for_inference

__all__ = ["ContextError", "InferenceError", "ROTARY_TYPES", "Turn", "fit_turn", "load_for_inference"]
