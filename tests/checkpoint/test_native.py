"""InternEvo's native checkpoint format (model_tp{t}_pp{p}.pt): written from full weights at any tensor/pipeline size,
read back, converted to HF, and loaded into training (issue: checkpoints)."""
from pathlib import Path

import pytest
import torch

from testkit.distributed import run_distributed
from testkit.train_configs import TINY_MODEL, tiny_config
from tools.convert2hf import main as convert2hf

UNEVEN_MODEL = {**TINY_MODEL, "num_layers": 3, "dtype": torch.float32}  # pp=2 splits it 1 + 2


def random_weights(model_dict: dict) -> dict[str, torch.Tensor]:
    from evods.model import InternLMForCausalLM, config_from_model_dict

    torch.manual_seed(0)
    model = InternLMForCausalLM(config_from_model_dict(model_dict))
    for param in model.parameters():  # norms and biases start as ones and zeros: make every value tell
        param.data.normal_()
    return model.state_dict()


def write_native(folder: Path, weights: dict, tp: int, pp: int, mlp_naming: str, embed_split_hidden: bool) -> None:
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout

    layout = NativeLayout(tp=tp, pp=pp, num_layers=UNEVEN_MODEL["num_layers"], embed_split_hidden=embed_split_hidden,
                          mlp_naming=mlp_naming)
    write_native_checkpoint(str(folder), weights, UNEVEN_MODEL, layout, step=7)


@pytest.mark.parametrize("mlp_naming", ["v1", "v2"])
@pytest.mark.parametrize("embed_split_hidden", [False, True], ids=["vocab_split_embedding", "hidden_split_embedding"])
def test_a_tp2_pp2_native_checkpoint_converts_to_one_hf_folder_exactly(tmp_path, mlp_naming, embed_split_hidden):
    from evods.checkpoint import hf_weights

    weights = random_weights(UNEVEN_MODEL)
    write_native(tmp_path / "native", weights, 2, 2, mlp_naming, embed_split_hidden)
    args = ["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "hf"), "--mlp_naming", mlp_naming]
    assert convert2hf(args) == 0
    exported = hf_weights(str(tmp_path / "hf"))
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[name], weights[name]) for name in weights)


@pytest.mark.parametrize("mlp_naming", ["v1", "v2"])
@pytest.mark.parametrize("embed_split_hidden", [False, True], ids=["vocab_split_embedding", "hidden_split_embedding"])
def test_native_files_hold_what_internevo_writes(tmp_path, mlp_naming, embed_split_hidden):
    weights = random_weights(UNEVEN_MODEL)
    write_native(tmp_path, weights, 2, 2, mlp_naming, embed_split_hidden)
    load = lambda name: torch.load(tmp_path / name, weights_only=False)  # noqa: E731
    stage0, stage1 = load("model_tp1_pp0.pt"), load("model_tp1_pp1.pt")
    hidden, vocab, heads, head_dim = 64, 512, 4, 16
    # the later stage gets the extra layer, numbered from 0 on its own stage
    assert {k.split(".")[2] for k in stage0 if ".blocks." in k} == {"0"}
    assert {k.split(".")[2] for k in stage1 if ".blocks." in k} == {"0", "1"}
    # Wqkv of tensor rank 1 holds heads 2 and 3 of q, then of k, then of v
    attn = "model.layers.2.self_attn"
    heads_2_3 = [weights[f"{attn}.{x}_proj.weight"].view(heads, head_dim, hidden)[2:].reshape(-1, hidden)
                 for x in "qkv"]
    assert torch.equal(stage1["model.blocks.1.mixer.Wqkv.weight"], torch.cat(heads_2_3))
    assert "model.blocks.0.mixer.out_proj.bias" in load("model_tp0_pp1.pt")
    assert "model.blocks.0.mixer.out_proj.bias" not in stage1
    assert stage1["model.blocks.0.mixer.out_proj.weight"].shape == (hidden, hidden // 2)
    up, down = ("w2", "w3") if mlp_naming == "v1" else ("w3", "w2")
    assert torch.equal(stage1[f"model.blocks.1.mlp.{up}.weight"], weights["model.layers.2.mlp.up_proj.weight"][128:])
    assert torch.equal(stage1[f"model.blocks.1.mlp.{down}.weight"],
                       weights["model.layers.2.mlp.down_proj.weight"][:, 128:])
    assert stage1["model.head.weight"].shape == (vocab // 2, hidden) and "model.norm.weight" in stage1
    embedding = "model.embedding.weight" if embed_split_hidden else "model.embedding.word_embeddings.weight"
    assert stage0[embedding].shape == ((vocab, hidden // 2) if embed_split_hidden else (vocab // 2, hidden))
    assert load("topo_tp1_pp0.json") == ({} if embed_split_hidden else
                                         {"model.embedding.word_embeddings": {"dim": 0}})
    assert load("model_config.pt")["num_layers"] == 3 and load("model_config.pt")["dtype"] is torch.float32
    assert load("7.step") == {"step": 7}


def test_the_wrong_mlp_naming_is_a_clear_error(tmp_path, capsys):
    write_native(tmp_path / "native", random_weights(UNEVEN_MODEL), 1, 1, "v2", False)
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "hf")]) == 1
    assert "looks like naming v2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- into training and back

def config(total_steps: int, ckpt: dict):
    return tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=total_steps),
                       model=dict(dtype="torch.float32"), parallel=dict(pipeline=dict(size=1), zero1=-1),
                       lr_scheduler=dict(total_steps=4, warmup_ratio=0.25),
                       ckpt=dict(enable_save_ckpt=True, checkpoint_every=2, auto_resume=False, **ckpt))


def train(total_steps: int, ckpt: dict, run_dir: str) -> dict:
    from evods.training.trainer import Trainer

    trainer = Trainer(config(total_steps, ckpt), run_dir=Path(run_dir))
    # numpy arrays travel by value; tensors would travel as shared memory that dies with this process
    start = {name: tensor.numpy().copy() for name, tensor in trainer.engine.engine.module.state_dict().items()}
    state = trainer.train()
    trainer.close()
    return {"start": start, "losses": [entry["loss"] for entry in state.history],
            "counters": (state.step_count, state.batch_count, state.num_consumed_tokens)}


def train_from(load_infos: list[dict], root: str) -> list[dict]:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    return [train(4, dict(save_ckpt_folder=f"local:{root}/ckpt{i}", load_ckpt_info=info), f"{root}/run{i}")
            for i, info in enumerate(load_infos)]


def test_native_checkpoints_train_on_and_round_trip_through_evods_hf_and_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from evods.checkpoint import hf_weights
    from evods.checkpoint.formats.checkpoint_model import read_checkpoint_model
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_export import export_native
    from evods.checkpoint.formats.internevo_layout import NativeLayout
    from evods.model import InternLMConfig, InternLMForCausalLM

    # an InternEvo tp=2, pp=2 model starts an evods run
    model_dict = {**TINY_MODEL, "dtype": torch.float32}
    weights = random_weights(model_dict)
    write_native_checkpoint(str(tmp_path / "internevo"), weights, model_dict, NativeLayout(tp=2, pp=2, num_layers=4),
                            step=0)
    first = run_distributed(train_from, 1, ([dict(path=str(tmp_path / "internevo"), content=("model",),
                                                  ckpt_type="internlm")], str(tmp_path / "a")))[0][0]
    assert all(torch.equal(torch.from_numpy(first["start"][name]), weights[name]) for name in weights)

    # its step-2 evods checkpoint, as a native checkpoint of InternEvo's newer naming, to HF InternLM and Llama
    evods_ckpt = tmp_path / "a" / "ckpt0" / "2"
    export_native(str(evods_ckpt), str(tmp_path / "native2"), tp=2, pp=2, mlp_naming="v2", embed_split_hidden=True)
    for fmt in ("internlm", "llama"):
        assert convert2hf(["--src", str(tmp_path / "native2"), "--tgt", str(tmp_path / fmt), "--format", fmt,
                           "--mlp_naming", "v2"]) == 0
    trained = InternLMForCausalLM(InternLMConfig.from_pretrained(evods_ckpt))
    trained.load_state_dict(hf_weights(str(tmp_path / "internlm")))
    _, evods_weights = read_checkpoint_model(str(evods_ckpt))
    assert all(torch.equal(trained.state_dict()[name], evods_weights[name]) for name in evods_weights)
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=input_ids).logits, trained(input_ids=input_ids).logits,
                                   rtol=1e-5, atol=1e-5)

    # the native checkpoint continues training as the evods one does without its Adam state
    content = ("model", "sampler", "scheduler")
    from_evods, from_native = run_distributed(train_from, 1, ([
        dict(path=str(evods_ckpt), content=content, ckpt_type="evods"),
        dict(path=str(tmp_path / "native2"), content=content, ckpt_type="internevo")], str(tmp_path / "b")))[0]
    assert from_native["losses"] == from_evods["losses"] and len(from_native["losses"]) == 2
    assert from_native["counters"] == from_evods["counters"]


# ------------------------------------------------------------------------------------ InternEvo's llama-layout files

LLAMA_MODEL = dict(hidden_size=64, num_layers=3, num_attention_heads=4, vocab_size=512, mlp_ratio=2,
                   layer_norm_epsilon=1e-5, no_bias=True, dtype=torch.float32)
# InternLM2's features at tiny size (its model dict keys): 2 KV heads for the 4 query heads, RoPE base 1e6, dynamic
# NTK past max_position_embeddings
INTERNLM2_SHAPED = dict(LLAMA_MODEL, num_kv_attention_heads=2, rope_base=1e6, use_dynamic_ntk_rope=True,
                        max_position_embeddings=16)


def write_llama_layout(folder: Path, weights: dict, tp: int, pp: int, adapt_hf: bool, embed_split_hidden: bool,
                       prefix: str, model: dict = LLAMA_MODEL) -> None:
    """Files as InternEvo writes its LLaMA-family names, written here from the published facts and independently of
    evods: revert_internlm.py (pp=1, no prefix, global block numbers, --version 2 MLP naming) and InternEvo's own saves
    (a file per stage, blocks numbered from 0 on each; the `model.` prefix of its NaiveAMP wrapper before 2024-03)."""
    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    head_dim = hidden // heads

    def meta_rotary_order(w):  # revert_internlm.py without --adapt_hf: each head's halves interleaved
        return w if adapt_hf else w.view(-1, 2, head_dim // 2, hidden).transpose(1, 2).reshape(-1, hidden)

    def per_rank(tensor, dim):
        return [chunk.clone() for chunk in tensor.chunk(tp, dim)]

    layers = [range(0, 1), range(1, 3)] if pp == 2 else [range(0, 3)]
    for stage, stage_layers in enumerate(layers):
        states = [{} for _ in range(tp)]
        for local, layer in enumerate(stage_layers):
            index = local if pp > 1 else layer
            hf = f"model.layers.{layer}"
            tensors = {
                "attention.wq.weight": per_rank(meta_rotary_order(weights[f"{hf}.self_attn.q_proj.weight"]), 0),
                "attention.wk.weight": per_rank(meta_rotary_order(weights[f"{hf}.self_attn.k_proj.weight"]), 0),
                "attention.wv.weight": per_rank(weights[f"{hf}.self_attn.v_proj.weight"], 0),
                "attention.wo.weight": per_rank(weights[f"{hf}.self_attn.o_proj.weight"], 1),
                "feed_forward.w1.weight": per_rank(weights[f"{hf}.mlp.gate_proj.weight"], 0),
                "feed_forward.w3.weight": per_rank(weights[f"{hf}.mlp.up_proj.weight"], 0),
                "feed_forward.w2.weight": per_rank(weights[f"{hf}.mlp.down_proj.weight"], 1),
                "attention_norm.weight": [weights[f"{hf}.input_layernorm.weight"]] * tp,
                "ffn_norm.weight": [weights[f"{hf}.post_attention_layernorm.weight"]] * tp,
            }
            for name, shards in tensors.items():
                for rank in range(tp):
                    states[rank][f"{prefix}layers.{index}.{name}"] = shards[rank]
        for rank in range(tp):
            if stage == 0:
                embedding = per_rank(weights["model.embed_tokens.weight"], 1 if embed_split_hidden else 0)
                states[rank][f"{prefix}tok_embeddings.weight"] = embedding[rank]
            if stage == pp - 1:
                states[rank][f"{prefix}norm.weight"] = weights["model.norm.weight"]
                states[rank][f"{prefix}output.weight"] = per_rank(weights["lm_head.weight"], 0)[rank]
            torch.save(states[rank], folder / f"model_tp{rank}_pp{stage}.pt")
    intermediate = weights["model.layers.0.mlp.gate_proj.weight"].shape[0]
    torch.save(dict(num_attention_heads=heads, embed_split_hidden=embed_split_hidden, vocab_size=512,
                    hidden_size=hidden, num_layers=3, norm_type="rmsnorm", layer_norm_epsilon=1e-5, no_bias=True,
                    mlp_ratio=round((intermediate - 255) / hidden + 0.01, 2),
                    num_kv_attention_heads=model.get("num_kv_attention_heads", heads), dtype=torch.float32,
                    norm_head=False, adapt_hf=adapt_hf, use_flash_attn=True, rope_base=model.get("rope_base", 10000),
                    **{key: model[key] for key in ("use_dynamic_ntk_rope", "max_position_embeddings") if key in model}),
               folder / "model_config.pt")


def load_through_ckpt_info(folder: Path, ckpt_type: str, model_dict: dict):
    """What training does with ckpt.load_ckpt_info before building the engine."""
    from evods.checkpoint import CheckpointManager
    from evods.model import MODEL_INITIALIZER

    ckpt = tiny_config(ckpt=dict(enable_save_ckpt=False, auto_resume=False, load_ckpt_info=dict(
        path=str(folder), content=("model",), ckpt_type=ckpt_type))).ckpt
    from evods.parallel import ParallelLayout

    model = MODEL_INITIALIZER.get_module("INTERNLM")(**model_dict)
    loader = CheckpointManager(ckpt, ParallelLayout(dp=1, pp=1, tp=1), model.config, None).loader
    loader.load_model_weights(model)
    loader.load_split_model_weights(model, embed_split_hidden=True)  # an HF folder: after the (here no) tensor split
    return model.eval()


@pytest.mark.parametrize("tp, pp, adapt_hf, embed_split_hidden, prefix, model_dict", [
    (1, 1, False, False, "", LLAMA_MODEL),  # revert_internlm.py
    (2, 1, False, True, "", LLAMA_MODEL),  # revert_internlm.py --tp_size 2 --embed_split
    (2, 2, True, False, "model.", LLAMA_MODEL),  # an InternEvo LLaMA run with adapt_hf, saved per stage via NaiveAMP
    (2, 1, False, False, "", INTERNLM2_SHAPED),  # grouped-query attention: a KV head per tensor rank
])
def test_a_llama_layout_checkpoint_loads_with_ckpt_type_llama_to_the_same_logits(tmp_path, tp, pp, adapt_hf,
                                                                                 embed_split_hidden, prefix,
                                                                                 model_dict):
    from evods.checkpoint import hf_weights
    from evods.model import InternLMForCausalLM

    weights = random_weights(model_dict)
    assert not any(name.endswith("_proj.bias") for name in weights)  # no_bias=True: a bias-free InternLM
    (tmp_path / "native").mkdir()
    write_llama_layout(tmp_path / "native", weights, tp, pp, adapt_hf, embed_split_hidden, prefix, model_dict)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model = load_through_ckpt_info(tmp_path / "native", "llama", model_dict)
    assert all(torch.equal(model.state_dict()[name], weights[name]) for name in weights)

    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "hf")]) == 0
    exported = InternLMForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.bias is False and hf_weights(str(tmp_path / "hf")).keys() == weights.keys()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)


def test_an_internlm2_shaped_model_equals_its_llama_export_within_and_past_max_position_embeddings(tmp_path):
    """4 query heads on 2 KV heads, no biases, RoPE base 1e6, dynamic NTK with factor 2: the stock LlamaForCausalLM
    of `convert2hf --format llama` computes evods' logits (the model dict's own keys, as InternEvo names them)."""
    from transformers import LlamaForCausalLM

    from evods.model import InternLMForCausalLM

    weights = random_weights(INTERNLM2_SHAPED)
    (tmp_path / "native").mkdir()
    write_llama_layout(tmp_path / "native", weights, 2, 1, True, False, "", INTERNLM2_SHAPED)
    for fmt in ("internlm", "llama"):
        assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / fmt), "--format", fmt,
                           "--scaling_factor", "2.0"]) == 0
    internlm = InternLMForCausalLM.from_pretrained(tmp_path / "internlm").eval()
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert internlm.config.rope.base == 1e6 and internlm.config.num_key_value_heads == 2
    assert (llama.config.num_key_value_heads, llama.config.attention_bias) == (2, False)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for length in (16, 48):  # within max_position_embeddings, and past it, where dynamic NTK rescales the base
            ours, theirs = internlm(ids[:, :length]).logits, llama(ids[:, :length]).logits
            assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max(), length


def test_llama_layout_mismatches_are_one_line_errors_that_name_the_cause(tmp_path):
    from evods.checkpoint import CheckpointError

    (tmp_path / "native").mkdir()
    write_llama_layout(tmp_path / "native", random_weights(LLAMA_MODEL), 2, 1, False, False, "")
    with_bias = {key: value for key, value in LLAMA_MODEL.items() if key != "no_bias"}
    with pytest.raises(CheckpointError, match=r"no q/k/v/o bias, but the model has \(bias=True\): set no_bias=True"):
        load_through_ckpt_info(tmp_path / "native", "llama", with_bias)
    with pytest.raises(CheckpointError, match=r"model_tp0_pp0.pt: its parameter names do not fit InternEvo's internlm "
                                              r"layout \(unexpected: layers.0.attention.wk.weight, layers.0.attention"
                                              r".wo.weight, ...\): they are InternEvo's llama layout; load it with "
                                              r"ckpt_type='llama' \(or 'internevo'\)"):
        load_through_ckpt_info(tmp_path / "native", "internlm", LLAMA_MODEL)


def test_convert2hf_takes_internevo_converter_options(tmp_path):
    import json

    write_native(tmp_path / "native", random_weights(UNEVEN_MODEL), 1, 1, "v1", False)
    # the training config's max_position_embeddings unless --max_pos; the dtype under both names
    assert convert2hf(["--src_folder", str(tmp_path / "native"), "--tgt_folder", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["max_position_embeddings"] == 2048 and config["dtype"] == config["torch_dtype"] == "float32"
    assert config["rotary"] == {"base": 10000, "type": "dynamic", "scaling_factor": 1.0}
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "b"), "--max_pos", "4096",
                       "--dtype", "bfloat16", "--scaling_factor", "2"]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096 and config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["rotary"] == {"base": 10000, "type": "dynamic", "scaling_factor": 2.0}
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "c"), "--rotary_type", "origin"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["rotary"] == {"base": 10000, "type": "origin"}
