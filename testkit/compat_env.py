"""A Python environment with an older transformers and without evods, for the tests that load exported folders the way
serving stacks pinned to transformers 4.x do. Made once under the repo's build/ folder and kept there.

One venv holds torch (the CPU wheel that `pip install torch==2.13.0` takes from disk, as the Makefile does) and
transformers 4.36.2; each further transformers version is a directory of its own packages that PYTHONPATH puts first,
so that a version costs seconds instead of another torch install.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "build" / "compat-transformers"
BASE = ["torch==2.13.0", "transformers==4.36.2", "tokenizers==0.15.2", "sentencepiece", "protobuf"]
# transformers version -> the packages that replace the venv's for it (the rest of the venv fits both)
OVERLAYS = {"4.44.2": ["transformers==4.44.2", "tokenizers==0.19.1"]}
STAMP = VENV / "installed.json"  # written last: a venv without it is half made and is made again
# The start of a script that must run as where evods is not installed, nor DeepSpeed: an exported folder's remote code
# needs neither (an import of either fails the script).
WITHOUT_EVODS = """
import sys
sys.modules["evods"] = None  # the editable install would otherwise find it
sys.modules["deepspeed"] = None  # as on a serving machine; transformers then sees no DeepSpeed
for blocked in ("evods", "deepspeed"):
    try:
        __import__(blocked)
        raise SystemExit(blocked + " is importable")
    except ImportError:
        pass
"""


def python() -> Path:
    return VENV / "bin" / "python"


def ensure() -> None:
    """Make the venv and the overlays unless the stamp says they are there (one maker at a time)."""
    wanted = {"base": BASE, "overlays": OVERLAYS}
    VENV.parent.mkdir(exist_ok=True)
    with open(VENV.parent / "compat-transformers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if STAMP.exists() and json.loads(STAMP.read_text()) == wanted:
            return
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
        # this interpreter's pip installs into the venv; no byte-compiling of torch's thousands of files
        pip = [sys.executable, "-m", "pip", "--python", str(python()), "install", "--quiet", "--no-compile"]
        subprocess.run([*pip, *BASE], check=True)
        for version, packages in OVERLAYS.items():
            subprocess.run([*pip, "--no-deps", "--target", str(VENV / f"transformers-{version}"), *packages],
                           check=True)
        STAMP.write_text(json.dumps(wanted))


def run(version: str | None, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` (Python source) under transformers `version` in the venv, or under this interpreter's
    transformers when `version` is None; WITHOUT_EVODS at its start keeps evods and DeepSpeed out of it."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if version in OVERLAYS:
        env["PYTHONPATH"] = str(VENV / f"transformers-{version}")
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    interpreter = sys.executable if version is None else str(python())
    return subprocess.run([interpreter, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True)
