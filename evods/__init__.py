"""evods: train InternLM models on DeepSpeed with InternEvo's workflow, formats and configs."""

__version__ = "0.1.0"

from . import model  # noqa: E402,F401  (registers InternLM with transformers' Auto classes)
