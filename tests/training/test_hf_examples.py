"""The examples users copy (issue: accelerate-style scripts and the Trainer): examples/accelerate_train.py under
`accelerate launch` and examples/hf_trainer_train.py under torchrun, each on 2 processes for 3 steps of the shipped
samples; the accelerate loop's losses, gradient norms and final weights equal train_ds.py's (fp32)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evods.data.tokenize import tokenize_file
from testkit.distributed import free_port, run_distributed
from testkit.paths import DATA, REPO, TOKENIZER

STEPS = 3
CONFIG = """
import runpy
globals().update({{k: v for k, v in runpy.run_path({demo!r}).items() if not k.startswith("__")}})
JOB_NAME = "library_parity"
data.update(seq_len=64, micro_bsz=2, micro_num=2, total_steps={steps}, train_folder={train!r})
model.update(hidden_size=64, num_layers=2, num_attention_heads=4)  # V7's vocabulary, as the sample data needs
lr_scheduler.update(total_steps={steps}, warmup_ratio=0.34)  # one warmup step, then cosine
parallel = dict(zero1=-1, tensor={tensor}, pipeline=dict(size=1))
ckpt = dict(enable_save_ckpt=False)
"""
WATCHED = ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    tokenize_file(DATA / "pretrain_en" / "c4_demo.jsonl", root / "train" / "en" / "c4.bin", TOKENIZER, progress=False)
    return root / "train"


def write_config(folder: Path, train_folder: Path, tensor: int = 1) -> Path:
    """configs/demo_cpu.py shrunk, on tools/tokenizer.py's output for the shipped C4 sample; clipping (1.0) bites."""
    path = folder / f"config_tp{tensor}.py"
    path.write_text(CONFIG.format(demo=str(REPO / "configs" / "demo_cpu.py"), train=str(train_folder), steps=STEPS,
                                  tensor=tensor))
    return path


def train_ds_run(config_path: str, run_dir: str) -> dict:
    """What `train_ds.py --config` does on this rank (evods.training.trainer.run), with the end weights."""
    import torch.distributed as dist

    from evods.config import load_config
    from evods.parallel import gather_tensor_parallel_state_dict
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    cfg = load_config(config_path)
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    state = trainer.train()
    trainer.close()
    weights = gather_tensor_parallel_state_dict(trainer.engine.engine.module,
                                                trainer.grid.get_tensor_model_parallel_group(),
                                                cfg.model.embed_split_hidden)
    return {"rank": dist.get_rank(), "history": [(e["loss"], e["grad_norm"]) for e in state.history],
            "weights": {name: weights[name].double().sum().item() for name in WATCHED}}


def launch(command: list, tmp_path: Path, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "output.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout + result.stderr


def loaded_weights(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    params = dict(model.named_parameters())
    return {name: params[name].detach().double().sum().item() for name in WATCHED}


def accelerate_launch(config_path: Path, accelerate_config: Path, out: Path, metrics: Path, tmp_path: Path) -> str:
    return launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                   "--main_process_port", str(free_port()), str(REPO / "examples" / "accelerate_train.py"),
                   "--config", str(config_path), "--output_dir", str(out), "--metrics_file", str(metrics)], tmp_path)


def check_against_reference(reference: list, out: Path, metrics: Path) -> None:
    """The accelerate run's losses, gradient norms and saved weights are train_ds.py's."""
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(STEPS)) and all(s["tokens_per_s"] > 0 for s in steps)
    for step, ((loss, grad_norm), record) in enumerate(zip(reference[0]["history"], steps)):
        assert math.isclose(record["loss"], loss, rel_tol=1e-5), (step, record, loss)
        assert math.isclose(record["grad_norm"], grad_norm, rel_tol=1e-5), (step, record, grad_norm)
    assert steps[0]["grad_norm"] > 1.0  # above hybrid_zero_optimizer.clip_grad_norm: the clipped update matched too
    for name, value in loaded_weights(out).items():  # the saved HF folder holds the same trained weights
        assert math.isclose(value, reference[0]["weights"][name], rel_tol=1e-5, abs_tol=1e-4), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("Hello").input_ids[0] == 1  # BOS: the tokenizer travels with it


@pytest.mark.parametrize("tensor", [1, 2])
def test_accelerate_example_equals_train_ds_on_two_processes(train_folder, tmp_path, tensor):
    """2 data-parallel ranks, or one model split over 2 tensor ranks (evods' tensor parallelism under accelerate).
    The data-parallel run goes again under a ZeRO-3 accelerate config, which accelerate writes with the weights'
    gathering for a save turned off: the script turns it on before training, and the end-of-run save works."""
    config_path = write_config(tmp_path, train_folder, tensor)
    reference = run_distributed(train_ds_run, world=2, args=(str(config_path), str(tmp_path / "ds")))
    assert reference[0]["history"] == reference[1]["history"] and len(reference[0]["history"]) == STEPS
    out, metrics = tmp_path / "hf", tmp_path / "metrics.jsonl"
    log = accelerate_launch(config_path, REPO / "examples" / "accelerate_zero1.yaml", out, metrics, tmp_path)
    # accelerate counts both CPU processes
    assert f"2 processes (rank 0), DeepSpeed ZeRO stage 1, tensor parallel {tensor}" in log
    check_against_reference(reference, out, metrics)
    if tensor == 1:
        zero3 = tmp_path / "accelerate_zero3.yaml"
        zero3.write_text((REPO / "examples" / "accelerate_zero1.yaml").read_text().replace(
            "zero_stage: 1", "zero_stage: 3\n  zero3_save_16bit_model: false"))
        log = accelerate_launch(config_path, zero3, tmp_path / "hf_zero3", tmp_path / "zero3.jsonl", tmp_path)
        assert "2 processes (rank 0), DeepSpeed ZeRO stage 3, tensor parallel 1" in log
        assert "Traceback" not in log
        check_against_reference(reference, tmp_path / "hf_zero3", tmp_path / "zero3.jsonl")


def test_hf_trainer_example_with_deepspeed_on_two_processes(train_folder, tmp_path):
    config_path, out = write_config(tmp_path, train_folder), tmp_path / "trainer"
    log = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(REPO / "examples" / "hf_trainer_train.py"), "--config", str(config_path), "--output_dir",
                  str(out), "--deepspeed", str(REPO / "examples" / "trainer_zero1.json")], tmp_path)
    assert "2 processes, 4 packs of 128 tokens per step" in log
    losses = [float(value) for value in re.findall(r"'loss': '([0-9.]+)'", log)]
    assert len(losses) == STEPS and all(math.isfinite(loss) and 10 < loss < 12 for loss in losses)
    weights = loaded_weights(out)
    assert all(math.isfinite(value) for value in weights.values()) and (out / "tokenizer.model").is_file()
    assert torch.load(out / "training_args.bin", weights_only=False).world_size == 2
