"""ZeRO-3 checkpoints (issue: ZeRO-2 and ZeRO-3 with CPU offload): DeepSpeed's sharded files under evods' step marker,
an exact resume, a resume as ZeRO-1 and at another data-parallel size, and a ZeRO-1 checkpoint resumed as ZeRO-3
(DeepSpeed's universal checkpoint), and the native and HF exports of the weights, consolidated from the shards, equal
to those of a ZeRO-1 checkpoint of the same weights."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config, zero3_ds_config
from tools.convert2hf import main as convert2hf

TOTAL_STEPS, SAVE_AT = 4, 2
ROWS_PER_STEP = 4


def config(stage: int, data_parallel: int, total_steps: int, ckpt: dict):
    return tiny_config(
        data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP // data_parallel, total_steps=total_steps),
        model=dict(dtype="torch.float32"), parallel=dict(zero=dict(stage=stage)),
        lr_scheduler=dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25), ckpt=ckpt)


def train(cfg, run_dir: str, save_first: str | None = None) -> dict:
    """Train `cfg`; with `save_first`, first save what was loaded as the checkpoint of step SAVE_AT there."""
    from evods.training.trainer import Trainer

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    override = zero3_ds_config(run_dir) if cfg.parallel.zero.stage == 3 else None
    trainer = Trainer(cfg, run_dir=Path(run_dir), ds_config_override=override)
    if save_first:
        trainer.checkpoints.saver.save(save_first, SAVE_AT, trainer._checkpoint_parts())
    state = trainer.train()
    trainer.close()
    loaded = trainer.checkpoints.loader.loaded
    return {"losses": [entry["loss"] for entry in state.history], "step_count": state.step_count,
            "loaded": loaded and loaded.describe().rsplit("/", 1)[-1]}  # the loaded checkpoint's folder name


def two_ranks(root: str) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    save = dict(enable_save_ckpt=True, checkpoint_every=SAVE_AT, auto_resume=True, save_ckpt_folder=f"local:{root}/z3")
    reference = train(config(3, 2, TOTAL_STEPS, dict(enable_save_ckpt=False)), f"{root}/reference")
    interrupted = train(config(3, 2, SAVE_AT, save), f"{root}/interrupted")
    resumed = train(config(3, 2, TOTAL_STEPS, save), f"{root}/resumed")
    # ZeRO-1 from the ZeRO-3 checkpoint; it saves what it loaded first, so both checkpoints hold the same weights
    as_zero1 = dict(enable_save_ckpt=True, checkpoint_every=math.inf, auto_resume=False,
                    save_ckpt_folder=f"local:{root}/z1",
                    load_ckpt_info=dict(path=f"local:{root}/z3/{SAVE_AT}", content=("all",), ckpt_type="evods"))
    zero1 = train(config(1, 2, TOTAL_STEPS, as_zero1), f"{root}/zero1", save_first=str(SAVE_AT))
    return {"reference": reference, "interrupted": interrupted, "resumed": resumed, "zero1": zero1}


def one_rank(root: str) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")

    def loading(folder: str) -> dict:
        return dict(enable_save_ckpt=False, auto_resume=False,
                    load_ckpt_info=dict(path=f"local:{root}/{folder}/{SAVE_AT}", content=("all",), ckpt_type="evods"))

    return {"zero3": train(config(3, 1, TOTAL_STEPS, loading("z3")), f"{root}/one_rank"),
            "zero1_as_zero3": train(config(3, 1, TOTAL_STEPS, loading("z1")), f"{root}/one_rank_from_zero1")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    ranks = run_distributed(two_ranks, world=2, args=(str(root),))
    return root, ranks[0], run_distributed(one_rank, world=1, args=(str(root),))[0]


def test_zero3_resumes_exactly_and_as_zero1_and_on_one_rank(runs):
    root, first, one = runs
    reference = first["reference"]["losses"]
    assert len(set(reference)) == TOTAL_STEPS, "training moves"
    assert first["interrupted"]["losses"] == reference[:SAVE_AT] and first["interrupted"]["loaded"] is None
    # bitwise: same data order, same weight shards, same Adam state, same schedules
    assert first["resumed"]["loaded"] == str(SAVE_AT) and first["resumed"]["losses"] == reference[SAVE_AT:]
    assert first["resumed"]["step_count"] == TOTAL_STEPS
    # through DeepSpeed's universal checkpoint: the same weights and Adam state, other summation orders
    for resumed in (first["zero1"], one["zero3"], one["zero1_as_zero3"]):
        assert resumed["loaded"] == str(SAVE_AT) and resumed["step_count"] == TOTAL_STEPS
        assert resumed["losses"] == pytest.approx(reference[SAVE_AT:], abs=1e-5, rel=0)
    saved = root / "z3" / str(SAVE_AT)
    files = {path.name for path in (saved / "deepspeed").iterdir()}
    # DeepSpeed's ZeRO-3 files, one model-states file and one optimizer shard per data rank, under evods' marker
    assert {f"zero_pp_rank_{d}_mp_rank_00_{kind}_states.pt" for d in (0, 1) for kind in ("model", "optim")} <= files
    assert "mp_rank_00_model_states.pt" not in files and (saved / f"{SAVE_AT}.step").is_file()
    assert not list(root.glob("z3/*/universal*")), "the conversion stays out of the checkpoint folder"


def test_exports_of_a_zero3_checkpoint_equal_those_of_zero1_with_the_same_weights(runs, tmp_path):
    from evods.checkpoint import read_checkpoint_model
    from evods.checkpoint.formats.internevo import read_native_model
    from evods.checkpoint.formats.internevo_export import export_native

    root, _, _ = runs
    zero3, zero1 = root / "z3" / str(SAVE_AT), root / "z1" / str(SAVE_AT)
    assert (zero1 / "deepspeed" / "mp_rank_00_model_states.pt").is_file()
    config3, weights3 = read_checkpoint_model(str(zero3))
    config1, weights1 = read_checkpoint_model(str(zero1))
    assert config3.to_dict() == config1.to_dict()
    assert weights3.keys() == weights1.keys()
    assert all(torch.equal(weights3[name], weights1[name]) and weights3[name].dtype == torch.float32
               for name in weights1)
    for name, folder in (("zero3", zero3), ("zero1", zero1)):
        assert convert2hf(["--src", str(folder), "--tgt", str(tmp_path / name / "hf")]) == 0
        export_native(str(folder), str(tmp_path / name / "native"), tp=2, pp=1, mlp_naming="v2",
                      embed_split_hidden=True)
    hf3, hf1 = (load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("zero3", "zero1"))
    assert hf3.keys() == hf1.keys() and all(torch.equal(hf3[name], hf1[name]) for name in hf1)
    native3, native1 = (read_native_model(str(tmp_path / name / "native"), mlp_naming="v2")[1]
                        for name in ("zero3", "zero1"))
    assert native3.keys() == native1.keys() and all(torch.equal(native3[name], native1[name]) for name in native1)
