"""A clone of evods is the whole project: what its README and demo name is in it, nothing reaches outside it, and CI
does not let a check skip."""
import os
import re
import subprocess
import sys
from pathlib import Path

from testkit.paths import NOT_THE_PROJECT, REPO

TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".txt", ".json", ".cfg", ".ini", ".yaml", ".yml", ""}
# Paths in commands that must be in a clone (outputs such as data/... or demo_out/... are made by the commands).
SHIPPED_PATH = re.compile(r"(?<![\w/.~-])(?:\./)?((?:tools|configs|samples|ds_configs)/[\w./-]*\w|train_ds\.py)")


def project_files():
    for root, folders, files in os.walk(REPO):
        if Path(root) == REPO:
            folders[:] = [f for f in folders if f not in NOT_THE_PROJECT]
        folders[:] = [f for f in folders if f != "__pycache__" and not f.endswith(".egg-info")]
        for name in files:
            path = Path(root, name)
            if path.suffix in TEXT_SUFFIXES and path.is_file():
                yield path


def test_nothing_in_the_project_reaches_beside_the_clone():
    # the team's reference folder beside the checkout: a user's clone has none (spelt apart: this file is searched)
    folder = "sha" + "red"
    needles = ("../" + folder, f'"{folder}"')
    found = [f"{path.relative_to(REPO)}: {needle}" for path in project_files()
             for needle in needles if needle in path.read_text(encoding="utf-8", errors="replace")]
    assert found == []


def commands(text: str) -> list[str]:
    """The shell lines of a Markdown file's bash blocks."""
    return [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]


def test_readme_and_demo_commands_name_files_a_clone_has():
    lines = commands((REPO / "README.md").read_text(encoding="utf-8"))
    lines += (REPO / "tools" / "demo.sh").read_text(encoding="utf-8").splitlines()  # incl. the next steps it prints
    named = {match for line in lines for match in SHIPPED_PATH.findall(line.split("#")[0])}
    assert {"train_ds.py", "tools/tokenizer.py", "configs/demo_cpu_resume.py"} <= named  # the pattern finds them
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert missing == []


def test_ci_fails_a_run_with_a_skipped_test(tmp_path):
    (tmp_path / "test_some.py").write_text("import pytest\n\ndef test_skipped():\n    pytest.skip('no data')\n\n"
                                           "def test_passes():\n    pass\n")

    def pytest_run(no_skips: str):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "EVODS_NO_SKIPS": no_skips})

    assert pytest_run("0").returncode == 0
    failed = pytest_run("1")
    assert failed.returncode == 1 and "EVODS_NO_SKIPS=1: 1 skipped, which fails the run" in failed.stdout
    assert "test_some.py::test_skipped: Skipped: no data" in failed.stdout
