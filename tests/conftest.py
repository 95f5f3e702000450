"""Shared fixtures: the tokenizer and real text that ship with the project (tools/V7_sft.model, samples/)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tools" / "V7_sft.model"
DATA = REPO / "samples"


@pytest.fixture
def tokenizer_path() -> Path:
    return TOKENIZER


@pytest.fixture
def data_dir() -> Path:
    return DATA
