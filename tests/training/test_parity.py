"""Data parallel (ZeRO-1) and pipeline runs train exactly like one process (issue: training on DeepSpeed).

Each launch trains several configurations in turn, so the suite pays the process start-up once per topology.
"""
import math
from pathlib import Path

import pytest

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config

STEPS = 3
ROWS_PER_STEP = 4  # packed rows per optimizer step, summed over data-parallel ranks
# The Llama family (issue 25): InternEvo's LLAMA2 type with grouped KV heads, Llama-3's RoPE scaling and the output
# head tied to the embedding, which a pipeline holds on its first and last stage (DeepSpeed's TiedLayerSpec, the
# gradient summed over the two)
LLAMA3_TIED = dict(num_kv_attention_heads=2, no_bias=True, rope_base=500000.0, tie_word_embeddings=True,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16))
VARIANTS = {  # name: (dtype, activation checkpointing, model type, model keys)
    "fp32": ("torch.float32", False, "INTERNLM", {}),
    "fp32_recompute": ("torch.float32", True, "INTERNLM", {}),
    "bf16": ("torch.bfloat16", False, "INTERNLM", {}),
    "llama3_tied_fp32": ("torch.float32", False, "LLAMA2", LLAMA3_TIED),
}


def train_variants(pipeline: int, data_parallel: int, run_root: str) -> dict:
    import torch.distributed as dist

    from evods.model.modeling_internlm import InternLMDecoderLayer
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    results = {}
    for name, (dtype, recompute, model_type, model_keys) in VARIANTS.items():
        cfg = tiny_config(
            model_type=model_type,
            data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP // data_parallel, total_steps=STEPS),
            model=dict(dtype=dtype, checkpoint=recompute, **model_keys),
            parallel=dict(pipeline=dict(size=pipeline), zero1=-1, tensor=1),
            lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0),
        )
        trainer = Trainer(cfg, run_dir=Path(run_root) / name)
        layers = [m for m in trainer.engine.engine.module.modules() if isinstance(m, InternLMDecoderLayer)]
        recomputed = sum(layer.gradient_checkpointing for layer in layers)  # model.checkpoint reached this rank's
        assert layers and recomputed == (len(layers) if recompute else 0), (name, recomputed, len(layers))
        state = trainer.train()
        results[name] = [(entry["loss"], entry["grad_norm"]) for entry in state.history]
    return {"rank": dist.get_rank(), "results": results}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_distributed(train_variants, world=1, args=(1, 1, str(tmp_path_factory.mktemp("ref"))))[0]["results"]


def assert_same_training(reference: dict, results: dict) -> None:
    for name in VARIANTS:
        tolerance = 2e-2 if name == "bf16" else 1e-5
        assert len(results[name]) == STEPS
        for step, ((ref_loss, ref_norm), (loss, norm)) in enumerate(zip(reference[name], results[name])):
            assert math.isclose(loss, ref_loss, rel_tol=tolerance), (name, step, loss, ref_loss)
            assert math.isclose(norm, ref_norm, rel_tol=tolerance), (name, step, norm, ref_norm)


def test_recompute_changes_nothing_and_training_moves(reference):
    assert reference["fp32_recompute"] == reference["fp32"]  # recomputation repeats the same operations
    assert reference["llama3_tied_fp32"][0] != reference["fp32"][0]  # another model
    losses = [loss for loss, _ in reference["fp32"]]
    assert len(set(losses)) == STEPS, "each step sees new data and new weights"


def test_zero1_data_parallel_matches_one_process(reference, tmp_path):
    ranks = run_distributed(train_variants, world=2, args=(1, 2, str(tmp_path)))
    for rank in ranks:  # every data-parallel rank reports the same mean loss
        assert_same_training(reference, rank["results"])


def test_pipeline_matches_one_process(reference, tmp_path):
    ranks = run_distributed(train_variants, world=2, args=(2, 1, str(tmp_path)))
    for rank in ranks:  # the pipeline engine broadcasts the last stage's loss to every stage
        assert_same_training(reference, rank["results"])
