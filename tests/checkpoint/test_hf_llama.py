"""A Hugging Face Llama folder as a training start (issue: Llama / Hugging Face starts): ckpt_type="hf_llama" (and
InternEvo's other names for it) reads a sharded `LlamaForCausalLM` folder that save_pretrained wrote, each rank only
its pipeline stage's tensors and its tensor slices of them; the first step's loss equals transformers' on the same
packed rows at every (tp, pp), and the next steps too: the tied output head (Llama-3.2) under tensor parallelism (one
parameter of vocabulary rows) and pipelines (DeepSpeed's TiedLayerSpec, its gradient summed over the first and last
stage); an export after 0 steps gives the source's weights bit for bit; bad folders are one line before anything is
built. Tiny fp32 models on CPU, the four layouts in one 4-rank launch."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from evods.checkpoint import CheckpointError
from evods.checkpoint.formats.hf_start import RankPart, load_rank_parts
from evods.checkpoint.resume.plan import check_same_model, choose_load_plan
from evods.config import CkptConfig
from evods.model import MODEL_INITIALIZER
from evods.parallel import TensorParallelSplit, stage_layers
from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config
from tools.convert2hf import main as convert2hf

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
# InternEvo's LLAMA2 model dict of the folder's model: 4 query heads over 2 KV heads, int(64 * 2.5) -> 160 MLP, the
# output head tied to the embedding (split by vocabulary rows under tensor parallelism)
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256,
             mlp_ratio=2.5, multiple_of=32, no_bias=True, rope_base=500000.0, max_position_embeddings=256,
             rope_scaling=LLAMA3_SCALING, layer_norm_epsilon=1e-5, dtype="torch.float32", tie_word_embeddings=True,
             embed_split_hidden=False)
STEPS = 2
ROWS, TOKENS = 2, 16  # packed rows of the first step, one document each
# (tensor, pp) on 4 ranks, the data-parallel size filling the rest; isp 2 under a pipeline: the tied embedding's two
# ends see the whole row (the first stage's embedding) and this rank's tokens (the last stage's head)
ISP2 = dict(size=2, mode="isp")
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (ISP2, 2)]


def layout_name(tensor, pp: int) -> str:
    return f"isp{tensor['size']}_pp{pp}" if isinstance(tensor, dict) else f"tp{tensor}_pp{pp}"
EXPORTED_LAYOUT = (2, 2)
SHARD_SIZE = "40KB"  # several safetensors shards for the tiny model


def llama_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"], intermediate_size=160,
                       num_hidden_layers=MODEL["num_layers"], num_attention_heads=MODEL["num_attention_heads"],
                       num_key_value_heads=MODEL["num_kv_attention_heads"], rms_norm_eps=1e-5,
                       max_position_embeddings=MODEL["max_position_embeddings"], attention_bias=False,
                       tie_word_embeddings=tie, rope_parameters={**LLAMA3_SCALING, "rope_theta": MODEL["rope_base"]})


def write_llama_folder(folder: Path, tie: bool, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie)).eval()
    with torch.no_grad():  # norms that are not all ones, so a norm read wrongly shows
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.to(dtype).save_pretrained(folder, max_shard_size=SHARD_SIZE)
    return model


def first_batch() -> dict:
    ids = torch.randint(0, MODEL["vocab_size"], (ROWS, TOKENS + 1), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(TOKENS).repeat(ROWS, 1),
            "type_ids": torch.zeros(ROWS, TOKENS, dtype=torch.long)}


def transformers_loss(folder: Path) -> float:
    """transformers' cross entropy of the batch's rows (one document each), averaged over the rows."""
    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    batch = first_batch()
    with torch.no_grad():
        logits = llama(input_ids=batch["input_ids"]).logits
    return float(torch.stack([F.cross_entropy(logits[row], batch["labels"][row]) for row in range(ROWS)]).mean())


def run_config(tp: int | dict, pp: int, folder: str, tie: bool = True, ckpt_type: str = "hf_llama",
               content: tuple = ("model",), zero_stage: int = 1, **ckpt):
    return tiny_config(model_type="LLAMA2", model=dict(MODEL, tie_word_embeddings=tie),
                       data=dict(seq_len=TOKENS, micro_bsz=1, micro_num=ROWS, total_steps=STEPS),
                       parallel=dict(pipeline=dict(size=pp), zero1=-1, tensor=tp, zero=dict(stage=zero_stage)),
                       lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0),
                       loss=dict(kernel="full" if zero_stage < 3 else "chunked"),  # (ZeRO-3 refuses "full")
                       ckpt=dict(auto_resume=False, enable_save_ckpt=bool(ckpt), load_ckpt_info=dict(
                           path=folder, content=content, ckpt_type=ckpt_type), **ckpt))


def start_from_hf(folders: dict, run_root: str) -> dict:
    """Every layout in turn: train STEPS steps on the same rows from the tied folder; the exported layout saves its
    step 0 before and its last step after. The parts of tensors each rank read are recorded."""
    import torch.distributed as dist

    from evods.checkpoint.formats import hf_start
    from evods.training import trainer as trainer_module
    from evods.training.distributed import init_distributed
    from evods.training.model_part import parameter_bytes
    from evods.training.trainer import Trainer

    reads, built = [], {}
    original_read = hf_start.SafetensorsFolder.read
    original_materialise = trainer_module.materialise_rank_part

    def recording_materialise(*args, **kwargs):  # the bytes of the rank's part, as the Trainer built it
        model = original_materialise(*args, **kwargs)
        built[reads[-1][0]] = parameter_bytes(model)
        return model

    def recording_read(self, name, part):
        tensor = original_read(self, name, part)
        reads[-1][1].append((name, tuple(tensor.shape)))
        return tensor

    hf_start.SafetensorsFolder.read = recording_read
    trainer_module.materialise_rank_part = recording_materialise
    init_distributed("torch")
    results = {"rank": dist.get_rank(), "losses": {}, "reads": {}, "stages": {}, "built": built}
    try:
        Trainer(run_config(2, 2, folders["qwen"], save_ckpt_folder=f"local:{run_root}/refused/ckpt"),
                run_dir=Path(run_root) / "refused" / "run")
    except CheckpointError as error:
        results["refused"] = str(error)
    for tp, pp in LAYOUTS:
        name = layout_name(tp, pp)
        saves = dict(save_ckpt_folder=f"local:{run_root}/{name}/ckpt") if (tp, pp) == EXPORTED_LAYOUT else {}
        reads.append((name, []))
        trainer = Trainer(run_config(tp, pp, folders["tied"], **saves), run_dir=Path(run_root) / name / "run")
        module = trainer.engine.engine.module
        results["stages"][name] = (getattr(module, "_local_start", None), getattr(module, "_local_stop", None))
        saver = trainer.checkpoints.saver
        if saves:
            saver.save("0", 0, trainer._checkpoint_parts())
        outcomes = [trainer.engine.train_step(first_batch()) for _ in range(STEPS)]
        results["losses"][name] = [(outcome.loss, outcome.grad_norm) for outcome in outcomes]
        if saves:
            saver.save(str(STEPS), STEPS, trainer._checkpoint_parts())
            saver.close()
            continued = trainer.engine.train_step(first_batch())
        trainer.close()
        if saves:  # the saved step resumed with its optimizer: the next step is the one the run took
            resume = run_config(tp, pp, f"local:{run_root}/{name}/ckpt/{STEPS}", ckpt_type="evods", content=("all",),
                                save_ckpt_folder=f"local:{run_root}/{name}/resumed")
            resumed = Trainer(resume, run_dir=Path(run_root) / name / "resumed_run")
            results["resumed"] = (continued.loss, resumed.engine.train_step(first_batch()).loss)
            resumed.close()
    results["reads"] = dict(reads)
    return results


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_llama")
    write_llama_folder(root / "tied", tie=True)
    relabel_as_qwen2(root / "qwen")
    return {"tied": str(root / "tied"), "qwen": str(root / "qwen"), "tied_digests": folder_digests(root / "tied")}


def folder_digests(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def relabel_as_qwen2(folder: Path) -> None:
    """A folder whose config.json says another architecture."""
    write_llama_folder(folder, tie=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def started(folders, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_root = tmp_path_factory.mktemp("runs")
    return run_root, run_distributed(start_from_hf, 4, (folders, str(run_root)), timeout=600)


def test_training_from_the_folder_leaves_it_as_it_was(folders, started):
    """The ranks' parameters start as views of the safetensors files' private mappings (hf_start.SafetensorsFolder):
    after every layout has trained from the folder, its files are byte for byte what save_pretrained wrote."""
    assert folder_digests(Path(folders["tied"])) == folders["tied_digests"]


def test_the_folder_is_sharded_with_one_copy_of_the_tied_weight(folders):
    index = json.loads((Path(folders["tied"]) / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and "lm_head.weight" not in index["weight_map"]


def test_first_step_loss_equals_transformers_and_training_goes_on_alike_at_every_layout(folders, started):
    """Step 1's loss is transformers'; the gradient norms and the next step's loss agree with one process holding the
    tied weight whole, so the tied weight's gradient is summed over its two ends and counted once."""
    _, ranks = started
    expected = transformers_loss(Path(folders["tied"]))
    reference = ranks[0]["losses"]["tp1_pp1"]
    assert reference[1][0] < reference[0][0]  # the step moved the weights
    for tp, pp in LAYOUTS:
        name = layout_name(tp, pp)
        for rank in ranks:
            steps = rank["losses"][name]
            assert math.isclose(steps[0][0], expected, rel_tol=1e-5), (name, rank["rank"], steps[0][0], expected)
            for (loss, norm), (ref_loss, ref_norm) in zip(steps, reference):
                assert math.isclose(loss, ref_loss, rel_tol=1e-5), (name, rank["rank"], loss, ref_loss)
                assert math.isclose(norm, ref_norm, rel_tol=1e-5), (name, rank["rank"], norm, ref_norm)


def test_a_tied_pipeline_resumes_with_its_optimizer_where_it_stopped(started):
    _, ranks = started
    for rank in ranks:
        continued, resumed = rank["resumed"]
        assert math.isclose(resumed, continued, rel_tol=1e-6), (rank["rank"], resumed, continued)


def test_the_tied_weight_stays_one_weight_in_the_checkpoint(started):
    """The first stage's embedding and the last stage's head, saved by different ranks, are equal after training."""
    from evods.checkpoint import deepspeed_weights

    run_root, _ = started
    tp, pp = EXPORTED_LAYOUT
    trained = deepspeed_weights(str(run_root / f"tp{tp}_pp{pp}" / "ckpt" / str(STEPS)))
    started_from = deepspeed_weights(str(run_root / f"tp{tp}_pp{pp}" / "ckpt" / "0"))
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])
    assert not torch.equal(trained["lm_head.weight"], started_from["lm_head.weight"])


def test_each_rank_reads_only_its_stage_and_its_slices(folders, started):
    """At tp 2 x pp 2 each rank reads the tensors of its stage's layers (those DeepSpeed's PipelineModule put there),
    each tensor-split one as half of it; together the ranks of one data-parallel replica read every tensor once."""
    _, ranks = started
    full = {}
    for path in Path(folders["tied"]).glob("*.safetensors"):
        full.update({name: tuple(tensor.shape) for name, tensor in load_file(path).items()})
    split = TensorParallelSplit(2, embed_split_hidden=False, kv_replicas=1)
    read_by_stage = {0: set(), 1: set()}
    for rank in ranks:
        tp_rank, pp_rank = rank["rank"] % 2, rank["rank"] // 2 % 2
        layers = stage_layers(MODEL["num_layers"], 2, pp_rank, tied_embeddings=True)
        assert rank["stages"]["tp2_pp2"] == (layers.start, layers.stop)
        for name, shape in rank["reads"]["tp2_pp2"]:
            part = split.part(name, full[name], tp_rank)
            expected = list(full[name])
            if part is not None:
                expected[part[0]] = full[name][part[0]] // 2
            assert shape == tuple(expected), (name, shape)
            read_by_stage[pp_rank].add(name)
    # the last stage reads its copy of the tied weight (the folder holds one) as lm_head's
    assert not read_by_stage[0] & read_by_stage[1] - {"model.embed_tokens.weight"}
    assert read_by_stage[0] | read_by_stage[1] == set(full) and "model.embed_tokens.weight" in read_by_stage[1]


def test_each_rank_builds_only_the_part_it_reads(folders, started):
    """No rank builds the whole model: the parameters it gives memory to are exactly the tensors it reads (its stage,
    its slices, the tied weight once), about a quarter of the model at tp 2 x pp 2 (its other stage's layers stay on
    the meta device), and all of it at tp 1 x pp 1."""
    _, ranks = started
    whole = sum(tensor.numel() * tensor.element_size() for path in Path(folders["tied"]).glob("*.safetensors")
                for tensor in load_file(path).values())
    for rank in ranks:
        for layout, bytes_built in rank["built"].items():
            read = dict(rank["reads"][layout])
            assert bytes_built == sum(math.prod(shape) * 4 for shape in read.values()), (layout, rank["rank"])
        assert rank["built"]["tp1_pp1"] == whole
        assert 0.25 * whole < rank["built"]["tp2_pp2"] < 0.3 * whole, (rank["rank"], rank["built"]["tp2_pp2"], whole)


def test_an_export_after_0_steps_is_the_source_bit_for_bit(folders, started, tmp_path):
    run_root, _ = started
    tp, pp = EXPORTED_LAYOUT
    assert convert2hf(["--src", str(run_root / f"tp{tp}_pp{pp}" / "ckpt" / "0"), "--tgt", str(tmp_path / "out"),
                       "--format", "llama"]) == 0
    source, exported = LlamaForCausalLM.from_pretrained(folders["tied"]), LlamaForCausalLM.from_pretrained(
        tmp_path / "out")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    exported_state = exported.state_dict()
    assert all(torch.equal(exported_state[name], tensor) for name, tensor in source.state_dict().items())
    ids = first_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, source(input_ids=ids).logits)


def ckpt_config(folder: Path, ckpt_type: str = "hf_llama") -> CkptConfig:
    return run_config(1, 1, str(folder), False, ckpt_type).ckpt


@pytest.mark.parametrize("ckpt_type", ["hf_llama", "hf_model", "hf"])
def test_internevo_names_of_an_hf_start_are_accepted(tmp_path, ckpt_type):
    write_llama_folder(tmp_path / "llama", tie=False)
    plan = choose_load_plan(ckpt_config(tmp_path / "llama", ckpt_type), None)
    assert plan.is_hf and plan.loads_weights_only


def test_a_bf16_folder_is_cast_to_the_run_dtype(tmp_path):
    source = write_llama_folder(tmp_path / "bf16", tie=True, dtype=torch.bfloat16)
    model = MODEL_INITIALIZER.get_module("LLAMA2")(**dict(MODEL, tie_word_embeddings=True))
    split = TensorParallelSplit.of(model.config, 1, True)
    load_rank_parts(model, str(tmp_path / "bf16"), RankPart(split, 0, MODEL["num_layers"]), "bf16 folder")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in source.state_dict().items():
        assert model.state_dict()[name].dtype == torch.float32 and torch.equal(model.state_dict()[name], tensor.float())


def one_line_error(work) -> str:
    with pytest.raises(CheckpointError) as error:
        work()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_another_architecture_is_one_line(tmp_path):
    relabel_as_qwen2(tmp_path / "qwen")
    message = one_line_error(lambda: choose_load_plan(ckpt_config(tmp_path / "qwen"), None))
    assert "is not a Hugging Face Llama folder" in message and "Qwen2ForCausalLM" in message


def test_a_run_refused_at_start_writes_nothing(started):
    """The 4-rank run from a folder of another architecture stopped before it built anything: rank 0 says why in one
    line, the other ranks that rank 0 failed; no run folder, no file (the storage opens the save folder, empty)."""
    run_root, ranks = started
    messages = {rank["rank"]: rank["refused"] for rank in ranks}
    assert "is not a Hugging Face Llama folder" in messages[0] and "\n" not in messages[0]
    assert all("failed on another rank" in messages[rank] for rank in (1, 2, 3))
    assert not (run_root / "refused" / "run").exists()
    assert not [path for path in (run_root / "refused").rglob("*") if not path.is_dir()]


def test_a_missing_shard_is_one_line(tmp_path):
    write_llama_folder(tmp_path / "llama", tie=False)
    shard = sorted((tmp_path / "llama").glob("model-*.safetensors"))[1]
    shard.unlink()
    message = one_line_error(lambda: choose_load_plan(ckpt_config(tmp_path / "llama"), None))
    assert f"shard {shard.name} named by model.safetensors.index.json is missing" in message


def test_sizes_or_layout_disagreeing_with_the_config_are_one_line_naming_both(tmp_path):
    write_llama_folder(tmp_path / "llama", tie=False)
    plan = choose_load_plan(ckpt_config(tmp_path / "llama"), None)
    run_model = MODEL_INITIALIZER.get_module("LLAMA2")(**dict(MODEL, hidden_size=128, tie_word_embeddings=True))
    message = one_line_error(lambda: check_same_model(plan, run_model.config))
    assert "hidden_size 64 there, 128 here" in message and "tie_word_embeddings False there, True here" in message


def test_the_llama3_demo_config_starts_from_the_folder_the_tool_writes(tmp_path):
    """configs/demo_cpu_llama3.py's model is the one tools/tiny_llama3.py writes (sizes and layout agree, every weight
    loads), and the folder's tokenizer fits its vocabulary."""
    from dataclasses import replace

    from evods.config import load_config
    from evods.data import check_tokenizer_fits
    from testkit.paths import REPO
    from tools.tiny_llama3 import main as tiny_llama3

    assert tiny_llama3(["--out", str(tmp_path / "llama3")]) == 0
    cfg = load_config(REPO / "configs" / "demo_cpu_llama3.py")
    assert cfg.ckpt.load_ckpt_info.ckpt_type == "hf_llama"
    ckpt = replace(cfg.ckpt, load_ckpt_info=replace(cfg.ckpt.load_ckpt_info, path=str(tmp_path / "llama3")))
    plan = choose_load_plan(ckpt, None)
    model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict)
    check_same_model(plan, model.config)
    load_rank_parts(model, str(tmp_path / "llama3"), RankPart(TensorParallelSplit.of(model.config, 1, False), 0,
                                                              cfg.model.num_layers), "demo folder")
    folder_model = LlamaForCausalLM.from_pretrained(tmp_path / "llama3")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in folder_model.state_dict().items())
    check_tokenizer_fits(str(tmp_path / "llama3"), cfg.model.vocab_size, "the demo model")


def start_under_zero3(folder: str, run_root: str) -> float:
    """ZeRO-3 (no tied head there): each rank's partitions of the folder's weights, gathered whole around the copy."""
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer
    from testkit.train_configs import zero3_ds_config

    init_distributed("torch")
    cfg = run_config(1, 1, folder, tie=False, zero_stage=3)
    assert cfg.parallel.zero.stage == 3
    Path(run_root).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir=Path(run_root) / "run", ds_config_override=zero3_ds_config(run_root))
    assert trainer.layout.zero_stage == 3
    loss = trainer.engine.train_step(first_batch()).loss
    trainer.close()
    return loss


def test_a_start_under_zero3_gives_transformers_loss(tmp_path):
    write_llama_folder(tmp_path / "untied", tie=False)
    ranks = run_distributed(start_under_zero3, 2, (str(tmp_path / "untied"), str(tmp_path / "z3")))
    expected = transformers_loss(tmp_path / "untied")
    assert all(math.isclose(loss, expected, rel_tol=1e-5) for loss in ranks), (ranks, expected)
