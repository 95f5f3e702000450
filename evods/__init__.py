"""evods: train InternLM models on DeepSpeed with InternEvo's workflow, formats and configs."""

__version__ = "0.1.0"
