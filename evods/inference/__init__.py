"""Inference on exported Hugging Face folders: loading them for chat, fitting a conversation into the context, and
measuring perplexity by position (tools/chat.py, tools/web_demo.py, tools/eval_long_context.py)."""
from .context import ContextError, Turn, fit_turn
from .loading import ROTARY_TYPES, InferenceError, load_for_inference

__all__ = ["ContextError", "InferenceError", "ROTARY_TYPES", "Turn", "fit_turn", "load_for_inference"]
