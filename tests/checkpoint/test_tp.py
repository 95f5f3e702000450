"""evods checkpoints under tensor parallelism (issue: checkpoints): a tp=2 run resumes exactly, its weights load into
a tp=1 run and back, and its checkpoint exports to one HF folder and to InternEvo's native format.

Two tp=2 layouts, pp=1 (embedding split over the vocabulary) and pp=2 (over hidden); one launch per step of the
story, each with several checks:
- each tp=2 layout: the uninterrupted reference, then a run that saves at step K;
- tp=1: a full resume from a tp=2 checkpoint is refused clearly; a model-only load of the tp=2, pp=2 checkpoint
  gives its weights, and that run saves a tp=1 checkpoint;
- each tp=2 layout again (a fresh process): auto-resume finishes exactly like the reference; a model-only load of
  the tp=1 checkpoint gives its weights.
The exports run in the test process, checked against the tp=2 runs' own weights gathered to tp=1.

Sequence parallelism (issue: sequence parallelism) rides along in the same launches: each tp=2 layout also trains
with it, saving at step K; the fresh process resumes that checkpoint without it, and the plain tp=2 checkpoint with
it.

Grouped-query attention (issue: InternLM2) too: an InternLM2-shaped model (no biases, RoPE base 1e6, dynamic NTK)
with one KV head for its 4 query heads, which both tensor ranks hold, saves at tp=2, pp=1; its weights load into
tp=1 (the KV head once), and it exports to HF InternLM and stock Llama folders computing the same logits.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config
from tests.parallel.test_tensor_parallel import as_numpy
from tools.convert2hf import main as convert2hf
from tools.convert2native import main as convert2native

TOTAL_STEPS, SAVE_AT = 4, 2
ROWS_PER_STEP = 4


# InternLM2's features at tiny size: 4 query heads sharing 1 KV head, no biases, a large RoPE base, dynamic NTK past
# max_position_embeddings
GQA_MODEL = dict(num_kv_attention_heads=1, no_bias=True, rope_base=1e6, use_dynamic_ntk_rope=True,
                 max_position_embeddings=16)


def tp_config(tp: int, pp: int, total_steps: int, ckpt: dict, embed_split_hidden: bool = False,
              sequence_parallel: bool = False, model: dict | None = None):
    return tiny_config(
        data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP, total_steps=total_steps),
        model=dict(dtype="torch.float32", embed_split_hidden=embed_split_hidden, parallel_output=True,
                   **(model or {})),
        parallel=dict(pipeline=dict(size=pp), zero1=-1, tensor=tp, sequence_parallel=sequence_parallel),
        lr_scheduler=dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25),  # the schedule of the whole run
        ckpt=dict(checkpoint_every=SAVE_AT, **ckpt),
    )


class _StageWeights:
    """A pipeline stage's parameters under their HF names, with the model's HF config, for
    `gather_tensor_parallel_state_dict`."""

    def __init__(self, pipeline_module, config):
        from evods.parallel import pipeline_parameter_name

        self.config = config
        self.weights = {pipeline_parameter_name(int(index), local, config.num_hidden_layers): tensor
                        for name, tensor in pipeline_module.state_dict().items()
                        for index, local in [name.split(".", 1)]}

    def state_dict(self) -> dict:
        return self.weights


def full_weights(trainer) -> dict[str, np.ndarray]:
    """The run's current weights as one tp=1 HF state dict (the same on every rank), gathered over tensor ranks with
    the plan's own gather and, under a pipeline, collected from every stage."""
    import torch.distributed as dist

    from evods.model import config_from_model_dict
    from evods.parallel import gather_tensor_parallel_state_dict

    model_cfg = trainer.cfg.model
    module = trainer.engine.engine.module
    tensor_group = trainer.grid.get_tensor_model_parallel_group()
    if trainer.layout.pp == 1:
        return as_numpy(gather_tensor_parallel_state_dict(module, tensor_group, model_cfg.embed_split_hidden))
    stage = _StageWeights(module, config_from_model_dict(trainer.cfg.model_dict))
    gathered = as_numpy(gather_tensor_parallel_state_dict(stage, tensor_group, model_cfg.embed_split_hidden))
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, gathered)
    return {name: array for weights in stages for name, array in weights.items()}


def train(tp: int, pp: int, total_steps: int, ckpt: dict, run_dir: str, embed_split_hidden: bool = False,
          sequence_parallel: bool = False, model: dict | None = None) -> dict:
    """Build a Trainer, note its starting weights, train, and report what the checks need."""
    from evods.training.trainer import Trainer

    cfg = tp_config(tp, pp, total_steps, ckpt, embed_split_hidden, sequence_parallel, model)
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    start = full_weights(trainer)
    state = trainer.train()
    trainer.close()
    loaded = trainer.checkpoints.loader.loaded
    return {"start": start, "end": full_weights(trainer), "losses": [entry["loss"] for entry in state.history],
            "counters": (state.step_count, state.batch_count), "loaded": loaded and (loaded.folder, loaded.reason)}


def no_save() -> dict:
    return dict(enable_save_ckpt=False, auto_resume=False)


def saving_into(folder: str) -> dict:
    return dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{folder}", auto_resume=True)


def model_only(path: str) -> dict:
    return dict(load_ckpt_info=dict(path=path, content=("model",), ckpt_type="evods"))


def full_resume(path: str) -> dict:
    return dict(no_save(), load_ckpt_info=dict(path=path, content=("all",), ckpt_type="evods"))


# name -> (pipeline size, embed_split_hidden) of the tp=2 runs: between them, every file layout and embedding split
TP2_LAYOUTS = {"tp2_pp1": (1, False), "tp2_pp2": (2, True)}


def save_at_tp2(root: str, layout: str) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    pp, embed_split_hidden = TP2_LAYOUTS[layout]
    grouped_query = {"grouped_query": train(2, pp, SAVE_AT, saving_into(f"{root}/gqa"), f"{root}/gqa_run",
                                            embed_split_hidden, model=GQA_MODEL)} if layout == "tp2_pp1" else {}
    return {**grouped_query,
            "reference": train(2, pp, TOTAL_STEPS, no_save(), f"{root}/{layout}_reference", embed_split_hidden),
            "interrupted": train(2, pp, SAVE_AT, saving_into(f"{root}/{layout}"), f"{root}/{layout}_interrupted",
                                 embed_split_hidden),
            # uninterrupted, saving at SAVE_AT on the way
            "sequence_parallel": train(2, pp, TOTAL_STEPS, saving_into(f"{root}/{layout}_sp"),
                                       f"{root}/{layout}_sp_run", embed_split_hidden, sequence_parallel=True)}


def load_into_tp1(root: str) -> dict:
    from evods.checkpoint import CheckpointError
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    try:  # auto_resume finds the tp=2 run's checkpoint and would load its optimizer state
        train(1, 1, TOTAL_STEPS, saving_into(f"{root}/tp2_pp1"), f"{root}/resume_tp1")
        refusal = None
    except CheckpointError as exc:
        refusal = str(exc)
    loaded = train(1, 1, SAVE_AT, dict(saving_into(f"{root}/tp1"), **model_only(f"{root}/tp2_pp2/{SAVE_AT}")),
                   f"{root}/model_tp1")
    grouped_query = train(1, 1, 1, dict(no_save(), **model_only(f"{root}/gqa/{SAVE_AT}")), f"{root}/gqa_tp1",
                          model=GQA_MODEL)
    return {"refusal": refusal, "loaded": loaded, "grouped_query": grouped_query}


def resume_at_tp2(root: str, layout: str) -> dict:
    """In a fresh process: the interrupted run auto-resumes; then a tp=1 checkpoint's weights start a run."""
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    pp, embed_split_hidden = TP2_LAYOUTS[layout]
    return {"resumed": train(2, pp, TOTAL_STEPS, saving_into(f"{root}/{layout}"), f"{root}/{layout}_resumed",
                             embed_split_hidden),
            "from_tp1": train(2, pp, 1, dict(no_save(), **model_only(f"{root}/tp1/{SAVE_AT}")),
                              f"{root}/{layout}_from_tp1", embed_split_hidden),
            "sp_to_tp": train(2, pp, TOTAL_STEPS, full_resume(f"{root}/{layout}_sp/{SAVE_AT}"),
                              f"{root}/{layout}_sp_to_tp", embed_split_hidden, sequence_parallel=False),
            "tp_to_sp": train(2, pp, TOTAL_STEPS, full_resume(f"{root}/{layout}/{SAVE_AT}"),
                              f"{root}/{layout}_tp_to_sp", embed_split_hidden, sequence_parallel=True)}


def world(layout: str) -> int:
    return 2 * TP2_LAYOUTS[layout][0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp_ckpt")
    saved = {layout: run_distributed(save_at_tp2, world(layout), (str(root), layout)) for layout in TP2_LAYOUTS}
    tp1 = run_distributed(load_into_tp1, 1, (str(root),))[0]  # needs the tp2_pp2 checkpoint
    resumed = {layout: run_distributed(resume_at_tp2, world(layout), (str(root), layout)) for layout in TP2_LAYOUTS}
    return {"root": root, "saved": saved, "tp1": tp1, "resumed": resumed}


def saved_weights(runs: dict, layout: str) -> dict:
    """The weights of the tp=2 run at its checkpoint, gathered to tp=1 by the plan (every rank has them all)."""
    return runs["saved"][layout][0]["interrupted"]["end"]


def assert_same_weights(actual: dict, expected: dict, where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for name, array in expected.items():
        assert np.array_equal(np.asarray(actual[name]), array), (where, name)


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
def test_tp2_resumes_exactly_with_sampler_and_rng(runs, layout):
    for first, second in zip(runs["saved"][layout], runs["resumed"][layout]):
        reference, interrupted, resumed = first["reference"], first["interrupted"], second["resumed"]
        assert interrupted["losses"] == reference["losses"][:SAVE_AT]
        assert resumed["loaded"][0] == str(SAVE_AT) and "auto_resume" in resumed["loaded"][1]
        # bitwise: same data order, same weight shards, same Adam state, same schedules
        assert resumed["losses"] == reference["losses"][SAVE_AT:]
        assert resumed["counters"] == reference["counters"]
        assert_same_weights(resumed["end"], reference["end"], f"{layout}: final weights after the resume")
    losses = runs["saved"][layout][-1]["reference"]["losses"]  # the last rank sees the loss on every layout
    assert len(set(losses)) == TOTAL_STEPS, "training moves"


def test_deepspeed_writes_one_model_file_per_tensor_rank(runs):
    """What the merge reads: the mpu's model-parallel rank (the tensor rank) names the file of a plain module, the
    topology's `model` coordinate those of a PipelineModule's layers."""
    plain = {p.name for p in (runs["root"] / "tp2_pp1" / str(SAVE_AT) / "deepspeed").iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= plain
    pipelined = {p.name for p in (runs["root"] / "tp2_pp2" / str(SAVE_AT) / "deepspeed").iterdir()}
    assert {f"layer_{layer:02d}-model_{rank:02d}-model_states.pt" for layer in range(6) for rank in (0, 1)} <= pipelined


def test_a_full_resume_across_tensor_sizes_is_refused_clearly(runs):
    refusal = runs["tp1"]["refusal"]
    assert refusal is not None, "a tp=2 optimizer state must not load into a tp=1 run"
    assert "saved with tensor size 2 and this run has 1" in refusal
    assert "content=('model',), ckpt_type='evods')" in refusal


def test_model_weights_load_across_tensor_sizes(runs):
    from evods.checkpoint import deepspeed_weights

    into_tp1 = runs["tp1"]["loaded"]
    assert_same_weights(into_tp1["start"], saved_weights(runs, "tp2_pp2"), "tp=2, pp=2 checkpoint loaded into tp=1")
    saved_by_tp1 = as_numpy(deepspeed_weights(str(runs["root"] / "tp1" / str(SAVE_AT))))
    assert_same_weights(saved_by_tp1, into_tp1["end"], "tp=1 checkpoint")
    for layout in TP2_LAYOUTS:
        for rank in runs["resumed"][layout]:
            assert_same_weights(rank["from_tp1"]["start"], saved_by_tp1, f"tp=1 checkpoint loaded into {layout}")


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
def test_a_tp2_checkpoint_exports_to_one_hf_folder(runs, layout, tmp_path):
    from transformers import AutoModelForCausalLM

    import evods.model  # noqa: F401 - registers InternLM with the Auto classes
    from evods.model import InternLMConfig, InternLMForCausalLM

    checkpoint = runs["root"] / layout / str(SAVE_AT)
    assert convert2hf(["--src", str(checkpoint), "--tgt", str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same_weights(as_numpy(exported.state_dict()), saved_weights(runs, layout), f"HF export of {layout}")
    trained = InternLMForCausalLM(InternLMConfig.from_pretrained(checkpoint)).eval()
    trained.load_state_dict({name: torch.from_numpy(array) for name, array in saved_weights(runs, layout).items()})
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=input_ids).logits, trained(input_ids=input_ids).logits)


def test_a_grouped_query_tp2_checkpoint_loads_at_tp1_and_exports_to_internlm_and_llama(runs, tmp_path, capsys):
    """Both tensor ranks held the one KV head: tp=1 gets it once, with the weights the tp=2 run had; the exports carry
    the KV heads and the RoPE (base 1e6, dynamic NTK with the export's factor 2) and compute the same logits, within
    max_position_embeddings (16) and past it. InternLM v1's native layout has no place for fewer KV heads;
    InternLM2's has."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import evods.model  # noqa: F401 - registers InternLM with the Auto classes
    from evods.checkpoint import read_native_model

    saved = runs["saved"]["tp2_pp1"][0]["grouped_query"]["end"]
    assert saved["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)  # one KV head of 16
    assert_same_weights(runs["tp1"]["grouped_query"]["start"], saved, "the tp=2 GQA checkpoint loaded into tp=1")
    checkpoint = runs["root"] / "gqa" / str(SAVE_AT)
    for fmt in ("internlm", "llama"):
        assert convert2hf(["--src", str(checkpoint), "--tgt", str(tmp_path / fmt), "--format", fmt,
                           "--scaling_factor", "2"]) == 0
    internlm = AutoModelForCausalLM.from_pretrained(tmp_path / "internlm").eval()
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert_same_weights(as_numpy(internlm.state_dict()), saved, "HF export of the GQA checkpoint")
    assert (internlm.config.num_key_value_heads, llama.config.num_key_value_heads) == (1, 1)
    # (the export writes both transformers schemas, so 5.x's rope_parameters also keep 4.x's "type"; see
    # tests/checkpoint/test_export_rope.py)
    rope = llama.config.rope_parameters
    assert {key: rope[key] for key in ("rope_type", "rope_theta", "factor")} == \
        {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    input_ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for length in (16, 40):  # the second rescales the RoPE base
            torch.testing.assert_close(llama(input_ids[:, :length]).logits,
                                       internlm(input_ids[:, :length]).logits, rtol=1e-5, atol=1e-5)
    assert convert2native(["--src", str(checkpoint), "--tgt", str(tmp_path / "v1"), "--model_type", "INTERNLM"]) == 1
    assert "has no grouped-query attention, and this model has num_key_value_heads=1 for num_attention_heads=4; " \
           "write it as model type INTERNLM2" in capsys.readouterr().err and not (tmp_path / "v1").exists()
    # InternLM2's native files (the default for a grouped-query model): both tensor ranks hold a copy of the KV head
    assert convert2native(["--src", str(checkpoint), "--tgt", str(tmp_path / "native"), "--tp", "2"]) == 0
    assert torch.load(tmp_path / "native" / "model_tp1_pp0.pt")["layers.0.attention.wqkv.weight"].shape == (4 * 16, 64)
    _, weights = read_native_model(str(tmp_path / "native"))
    assert_same_weights(as_numpy(weights), saved, "InternLM2 native export of the GQA checkpoint")


def test_a_tp2_checkpoint_exports_to_native(runs, tmp_path):
    from evods.checkpoint import read_native_model

    checkpoint = runs["root"] / "tp2_pp1" / str(SAVE_AT)
    assert convert2native(["--src", str(checkpoint), "--tgt", str(tmp_path / "native"), "--tp", "2"]) == 0
    _, weights = read_native_model(str(tmp_path / "native"))
    assert_same_weights(as_numpy(weights), saved_weights(runs, "tp2_pp1"), "native export of tp2_pp1")


def checkpoint_files(folder: Path) -> set:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
def test_checkpoints_interchange_with_sequence_parallelism(runs, layout):
    """Saved with sequence parallelism and resumed without it, and the reverse: the same files, the weights loaded
    exactly, and training goes on as without the switch. The forward of both is the same arithmetic, so the first
    resumed loss is bitwise that of the run that did not switch; the backward sums the token slices' gradients in
    another order, so later steps agree to the parity tolerance."""
    from evods.checkpoint import deepspeed_weights

    plain, sliced = runs["root"] / layout / str(SAVE_AT), runs["root"] / f"{layout}_sp" / str(SAVE_AT)
    assert checkpoint_files(sliced) == checkpoint_files(plain)
    sliced_weights = as_numpy(deepspeed_weights(str(sliced)))
    expected = saved_weights(runs, layout)
    assert {k: v.shape for k, v in sliced_weights.items()} == {k: v.shape for k, v in expected.items()}
    for first, second in zip(runs["saved"][layout], runs["resumed"][layout]):
        switched = {"sp_to_tp": (first["sequence_parallel"], second["sp_to_tp"]),
                    "tp_to_sp": (first["reference"], second["tp_to_sp"])}
        assert_same_weights(second["sp_to_tp"]["start"], sliced_weights, f"{layout}: the sequence-parallel save")
        assert_same_weights(second["tp_to_sp"]["start"], saved_weights(runs, layout), f"{layout}: the plain save")
        for name, (unswitched, resumed) in switched.items():
            assert resumed["loaded"], name  # (the checkpoint folder itself, so no sub-folder name)
            assert resumed["counters"] == unswitched["counters"], name
            expected = unswitched["losses"][SAVE_AT:]
            assert resumed["losses"][0] == expected[0], (layout, name, resumed["losses"], expected)
            assert resumed["losses"] == pytest.approx(expected, rel=1e-5, abs=0), (layout, name)


def test_a_sequence_parallel_checkpoint_exports_to_native(runs, tmp_path):
    from evods.checkpoint import read_native_model

    checkpoint = runs["root"] / "tp2_pp1_sp" / str(SAVE_AT)
    assert convert2native(["--src", str(checkpoint), "--tgt", str(tmp_path / "native"), "--tp", "2"]) == 0
    _, weights = read_native_model(str(tmp_path / "native"))
    loaded = runs["resumed"]["tp2_pp1"][0]["sp_to_tp"]["start"]  # what DeepSpeed loaded from it, gathered
    assert_same_weights(as_numpy(weights), loaded, "native export of the sequence-parallel tp2_pp1 checkpoint")
