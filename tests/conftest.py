"""Shared fixtures (the helpers behind them live in testkit/): the tokenizer and real text that ship with the project
(tools/V7_sft.model, samples/), and the S3 server.

With EVODS_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run: in CI every check runs for real.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from evods.checkpoint.formats.hf_tokenizer import CACHE_ENV
from testkit.paths import DATA, TOKENIZER

# The S3 fixtures (moto_server, s3_endpoint): a real S3 endpoint over HTTP on 127.0.0.1.
pytest_plugins = ["testkit.s3_server"]


@pytest.fixture
def tokenizer_path() -> Path:
    return TOKENIZER


@pytest.fixture
def data_dir() -> Path:
    return DATA


def pytest_configure(config):
    # converted tokenizers are cached for the session and its subprocesses, not in the user's ~/.cache
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = config.stash.setdefault(_CACHE, tempfile.mkdtemp(prefix="evods-test-cache-"))


def pytest_unconfigure(config):
    if _CACHE in config.stash:
        shutil.rmtree(config.stash[_CACHE], ignore_errors=True)


_CACHE = pytest.StashKey[str]()


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
