"""Shared fixtures: the ../shared material (tokenizer, real text) and a multi-process harness."""
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "tokenizers" / "V7_sft.model"
DATA = SHARED / "data"


def need_shared(path: Path) -> Path:
    """Return `path` inside ../shared; in CI a missing file is a failure, elsewhere a skip."""
    if path.exists():
        return path
    message = f"{path} is missing: clone the project next to its shared/ folder"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def tokenizer_path() -> Path:
    return need_shared(TOKENIZER)


@pytest.fixture
def data_dir() -> Path:
    return need_shared(DATA)
