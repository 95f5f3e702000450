"""Shared fixtures: the tokenizer and real text that ship with the project (tools/V7_sft.model, samples/).

With EVODS_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run: in CI every check runs for real.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tools" / "V7_sft.model"
DATA = REPO / "samples"
# What a working checkout holds besides the project (made by make, runs and the README's commands).
NOT_THE_PROJECT = {".git", ".venv", "build", "runs", "demo_out", "data", "llm_ckpts", "hf", "native", ".pytest_cache"}

@pytest.fixture
def tokenizer_path() -> Path:
    return TOKENIZER


@pytest.fixture
def data_dir() -> Path:
    return DATA


def _skipped(config) -> list:
    """Skipped tests and test files (a skip at collection too), when EVODS_NO_SKIPS=1 forbids them."""
    if os.environ.get("EVODS_NO_SKIPS") != "1":
        return []
    return config.pluginmanager.get_plugin("terminalreporter").stats.get("skipped", [])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    if _skipped(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    skipped = _skipped(config)
    if skipped:
        terminalreporter.write_sep("=", f"EVODS_NO_SKIPS=1: {len(skipped)} skipped, which fails the run", red=True)
        for report in skipped:
            terminalreporter.write_line(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")
