"""`pip install .` (not editable) gives a whole evods: commands, package data and `import evods`, from any folder."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from testkit.paths import DATA, NOT_THE_PROJECT, REPO

COMMANDS = ("evods-train", "evods-tokenizer", "evods-alpaca-tokenizer", "evods-chat-tokenizer", "evods-convert2hf",
            "evods-convert2native", "evods-generate", "evods-chat", "evods-web-demo", "evods-eval-long-context",
            "evods-serve")


def copy_checkout(target: Path) -> Path:
    """The project as a clone has it; the build writes build/ and *.egg-info there, not into the repo."""
    def skip(folder, names):
        return [n for n in names if (folder == str(REPO) and n in NOT_THE_PROJECT) or n == "__pycache__"
                or n.endswith(".egg-info")]

    return Path(shutil.copytree(REPO, target, symlinks=True, ignore=skip))


def make_venv(path: Path) -> Path:
    """A fresh venv whose dependencies (torch, DeepSpeed, ...) are those of the running one: a .pth line adds its
    site-packages after the new venv's own, so evods itself can only come from the install under test. (The running
    venv's editable evods is not seen: its .pth files are not processed from an added path.)"""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    Path(site_packages, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run(args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_pip_install_trains_from_another_folder(tmp_path):
    python = make_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", copy_checkout(tmp_path / "clone")], cwd=tmp_path)
    shutil.rmtree(tmp_path / "clone")  # the installed package must not lean on the source it came from
    bin_dir = python.parent
    assert all((bin_dir / command).is_file() for command in COMMANDS)
    work = tmp_path / "work"
    work.mkdir()

    probe = run([python, "-c", "import importlib.metadata, evods; print(evods.__file__); print(evods.__version__); "
                 "print(importlib.metadata.version('evods'))"], cwd=work).stdout.split()
    assert probe[0].startswith(str(tmp_path / "venv")) and probe[1] == probe[2]

    # the tokenizer the package carries (no --tokenizer_path), then a user's own config trained on that data
    run([bin_dir / "evods-tokenizer", "--text_input_path", DATA / "pretrain_en" / "wiki_demo.txt",
         "--bin_output_path", "data/train/en/wiki.bin", "--quiet"], cwd=work)
    config = work / "my_config.py"
    config.write_text((REPO / "configs" / "demo_cpu.py").read_text() +
                      "model.update(hidden_size=64, num_layers=2, num_attention_heads=4)\n"
                      "data.update(seq_len=64, total_steps=1, train_folder='data/train')\n"
                      "lr_scheduler.update(total_steps=1)\nckpt.update(enable_save_ckpt=False)\n")
    result = run([bin_dir / "evods-train", "--config", "my_config.py", "--run_dir", "run"], cwd=work)
    assert "===========New Run" in result.stderr and result.stderr.count("tflops=") == 1
    assert "loss/en=" in result.stderr  # trained on the tokenized text, not on random data
    # the DeepSpeed defaults came from the package
    ds_config = json.loads((work / "run" / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["steps_per_print"] == 1000000000
