"""Paths of the repository and of the tokenizer and real text that ship with it (tools/V7_sft.model, samples/)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tools" / "V7_sft.model"
DATA = REPO / "samples"
# What a working checkout holds besides the project (made by make, runs and the README's commands).
NOT_THE_PROJECT = {".git", ".venv", "build", "runs", "demo_out", "data", "llm_ckpts", "hf", "native", ".pytest_cache"}
