"""InternEvo's INTERNLM2 native files (a grouped `wqkv` per layer, `tok_embeddings`/`layers.*`/`output` names) and
InternLM3's (split `wq/wk/wv`): the row layout pinned, written at one tensor/pipeline size and read at others."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from evods.checkpoint import CheckpointError, read_native_model
from evods.checkpoint.formats.internevo_layout import AttentionHeads, GroupedQKV, KVHeadRows
from evods.inference.loading import TOKENIZER_FILES, load_for_inference
from testkit.distributed import run_distributed
from testkit.paths import REPO
from testkit.train_configs import tiny_config
from tests.checkpoint.test_native import load_through_ckpt_info, random_weights
from tools.convert2hf import main as convert2hf
from tools.convert2native import main as convert2native

# 8 query heads on 4 KV heads: two query heads per group, so a group is (q, q, k, v)
HEADS = AttentionHeads(num_heads=8, num_kv_heads=4, head_dim=4)
SLOTS = HEADS.num_heads // HEADS.num_kv_heads + 2


def row_code(group: int, slot: int, dim: int) -> float:
    return 100 * group + 10 * slot + dim


def hand_built_wqkv() -> torch.Tensor:
    """InternEvo's grouped wqkv of one layer, one column: the row of (group g, slot s, dim i) holds 100g + 10s + i.
    Slots 0..q_per_kv-1 are the group's query heads, then its key head, then its value head."""
    return torch.tensor([[row_code(g, s, i)] for g in range(HEADS.num_kv_heads) for s in range(SLOTS)
                         for i in range(HEADS.head_dim)])


def q_k_v_of(wqkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_proj, k_proj, v_proj (HF's and Llama's names, evods' too) as InternLM's tools/convert2llama.py splits wqkv:
    rows as (groups, slots, head_dim), split into the q slots, the k slot and the v slot."""
    grouped = wqkv.view(HEADS.num_kv_heads, SLOTS, HEADS.head_dim, -1)
    q, k, v = grouped.split([SLOTS - 2, 1, 1], dim=1)
    return q.reshape(-1, wqkv.shape[1]), k.reshape(-1, wqkv.shape[1]), v.reshape(-1, wqkv.shape[1])


def head_codes(rows: torch.Tensor) -> list[tuple[int, int]]:
    """(group, slot) of each head of a q/k/v tensor, read off its rows' codes (checking the dims stay in order)."""
    codes = []
    for head in rows.view(-1, HEADS.head_dim):
        group, slot = int(head[0]) // 100, int(head[0]) // 10 % 10
        assert head.tolist() == [row_code(group, slot, i) for i in range(HEADS.head_dim)]
        codes.append((group, slot))
    return codes


def test_the_grouped_wqkv_maps_to_the_right_q_k_v_heads_at_every_tensor_size():
    wqkv = hand_built_wqkv()
    q, k, v = q_k_v_of(wqkv)
    # the HF/Llama form: query head h is slot h % 2 of group h // 2; KV head g is group g's slots 2 (k) and 3 (v)
    assert head_codes(q) == [(h // 2, h % 2) for h in range(8)]
    assert head_codes(k) == [(g, 2) for g in range(4)] and head_codes(v) == [(g, 3) for g in range(4)]

    grouped = GroupedQKV(HEADS)
    for tp in (1, 2, 4):  # whole groups per rank: InternEvo's torch.chunk of the grouped rows
        shards = [grouped.shard([q, k, v], tp, rank) for rank in range(tp)]
        assert all(torch.equal(shard, chunk) for shard, chunk in zip(shards, wqkv.chunk(tp)))
        assert all(torch.equal(a, b) for a, b in zip(grouped.merge(shards), (q, k, v)))
    # more ranks than KV heads: rank r holds query head r and a copy of its group's k and v
    shards = [grouped.shard([q, k, v], 8, rank) for rank in range(8)]
    assert [head_codes(shard) for shard in shards] == [[(r // 2, r % 2), (r // 2, 2), (r // 2, 3)] for r in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(grouped.merge(shards), (q, k, v)))
    # split k and v (InternLM3's files) shard the same KV heads
    assert [head_codes(KVHeadRows(HEADS).shard([k], 8, r)) for r in range(8)] == [[(r // 2, 2)] for r in range(8)]

    # qk_interleaved=True: each q and k head's rotary pairs interleaved (dims 0, 2, 1, 3), v untouched
    interleaved = GroupedQKV(HEADS, interleaved=True).shard([q, k, v], 1, 0).view(4, SLOTS, HEADS.head_dim)
    assert interleaved[1, 0].tolist() == [row_code(1, 0, i) for i in (0, 2, 1, 3)]
    assert interleaved[1, 2].tolist() == [row_code(1, 2, i) for i in (0, 2, 1, 3)]
    assert interleaved[1, 3].tolist() == [row_code(1, 3, i) for i in range(4)]


INTERNLM2_MODEL = dict(hidden_size=32, num_layers=3, num_attention_heads=8, num_kv_attention_heads=4, vocab_size=512,
                       mlp_ratio=3.5, no_bias=True, rope_base=1e6, layer_norm_epsilon=1e-5, dtype=torch.float32)


def write_internlm2(folder: Path, weights: dict, tp: int, pp: int, qk_interleaved: bool = False) -> None:
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout

    layout = NativeLayout(tp=tp, pp=pp, num_layers=3, family="internlm2", mlp_naming="v2", bias=False,
                          heads=AttentionHeads(8, 4, 4), qk_interleaved=qk_interleaved)
    write_native_checkpoint(str(folder), weights, INTERNLM2_MODEL, layout, step=3)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_an_internlm2_native_checkpoint_written_at_tp2_loads_at_tp_1_4_and_8_to_the_same_logits(tmp_path):
    from evods.model import InternLMForCausalLM

    weights = random_weights(INTERNLM2_MODEL)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits_of(built_with(weights), ids)
    write_internlm2(tmp_path / "tp2", weights, tp=2, pp=2, qk_interleaved=True)
    stage1 = torch.load(tmp_path / "tp2" / "model_tp1_pp1.pt")
    # InternEvo's names, no prefix, blocks from 0 on each stage; rank 1 holds groups 2 and 3 of the grouped wqkv
    assert {"layers.1.attention.wqkv.weight", "layers.1.feed_forward.w3.weight", "output.weight",
            "norm.weight"} <= stage1.keys() and not any(name.startswith("model.") for name in stage1)
    assert stage1["layers.1.attention.wqkv.weight"].shape == (2 * SLOTS * 4, 32)
    saved = torch.load(tmp_path / "tp2" / "model_config.pt")
    assert saved["qk_interleaved"] is True and saved["num_kv_attention_heads"] == 4

    for tp in (1, 4, 8):  # convert2native reshards it; InternEvo's ckpt_type names load every size
        folder = tmp_path / f"tp{tp}"
        assert convert2native(["--src", str(tmp_path / "tp2"), "--tgt", str(folder), "--tp", str(tp),
                               "--model_type", "INTERNLM2"]) == 0
        ckpt_type = "internevo" if tp < 8 else "internlm2_test"
        assert torch.equal(logits_of(load_through_ckpt_info(folder, ckpt_type, INTERNLM2_MODEL), ids), reference)
    assert torch.load(tmp_path / "tp8" / "model_tp7_pp0.pt")["layers.0.attention.wqkv.weight"].shape == (3 * 4, 32)
    assert torch.load(tmp_path / "tp1" / "model_config.pt")["qk_interleaved"] is False  # evods writes HF's order

    assert convert2hf(["--src", str(tmp_path / "tp8"), "--tgt", str(tmp_path / "hf")]) == 0
    exported = InternLMForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (exported.config.num_key_value_heads, exported.config.rope.base) == (4, 1e6)
    assert torch.equal(logits_of(exported, ids), reference)


def built_with(weights: dict):
    from evods.model import MODEL_INITIALIZER

    model = MODEL_INITIALIZER.get_module("INTERNLM2")(**INTERNLM2_MODEL)
    model.load_state_dict(weights)
    return model.eval()


def test_internlm3_files_split_wq_wk_wv_and_share_kv_heads_past_the_kv_count(tmp_path):
    model_dict = {**INTERNLM2_MODEL, "num_kv_attention_heads": 2}
    weights = random_weights(model_dict)
    internlm2 = tmp_path / "internlm2"
    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout

    write_native_checkpoint(str(internlm2), weights, model_dict,
                            NativeLayout(tp=2, pp=1, num_layers=3, family="internlm2", mlp_naming="v2", bias=False),
                            step=1)
    assert convert2native(["--src", str(internlm2), "--tgt", str(tmp_path / "internlm3"), "--tp", "4",
                           "--model_type", "INTERNLM3"]) == 0
    rank3 = torch.load(tmp_path / "internlm3" / "model_tp3_pp0.pt")
    assert rank3["layers.0.attention.wq.weight"].shape == (2 * 4, 32)  # its 2 of the 8 query heads
    assert torch.equal(rank3["layers.0.attention.wk.weight"], weights["model.layers.0.self_attn.k_proj.weight"][4:])
    saved = torch.load(tmp_path / "internlm3" / "model_config.pt")
    assert (saved["enable_qkv_fusion"], saved["qk_interleaved"]) == (False, False)
    model = load_through_ckpt_info(tmp_path / "internlm3", "internevo", model_dict)
    assert all(torch.equal(model.state_dict()[name], weights[name]) for name in weights)


def test_internlm2_files_that_do_not_fit_are_one_line_errors(tmp_path, capsys):
    weights = random_weights(INTERNLM2_MODEL)
    write_internlm2(tmp_path / "native", weights, tp=2, pp=1)
    with pytest.raises(CheckpointError, match=r"model_tp0_pp0.pt: its parameter names do not fit InternEvo's internlm "
                                              r"layout .*: they are InternEvo's internlm2 layout; load it with "
                                              r"ckpt_type='internevo' \(or 'internlm2_test'\)"):
        load_through_ckpt_info(tmp_path / "native", "internlm", INTERNLM2_MODEL)
    assert convert2native(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "v1"),
                           "--model_type", "INTERNLM"]) == 1
    assert "this model has num_key_value_heads=4 for num_attention_heads=8; write it as model type INTERNLM2 " \
           "(tools/convert2native.py --model_type INTERNLM2)" in capsys.readouterr().err
    assert not (tmp_path / "v1" / "model_config.pt").exists()
    # which a grouped-query model gets by default
    assert convert2native(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "default")]) == 0
    assert "layers.0.attention.wqkv.weight" in torch.load(tmp_path / "default" / "model_tp0_pp0.pt")
    config_file = tmp_path / "native" / "model_config.pt"
    torch.save({**torch.load(config_file), "num_kv_attention_heads": 2}, config_file)
    with pytest.raises(CheckpointError, match=r"^tensor rank 0's wqkv has 32 rows; 8 query and 2 KV heads of 4 over 2 "
                                              r"ranks give 24: model_config.pt does not describe this checkpoint$"):
        read_native_model(str(tmp_path / "native"))


def write_published_internlm2(folder: Path, weights: dict) -> None:
    """An HF folder as InternLM publishes InternLM2 (an early one: `"model_type": "internlm"`, InternLM2's classes in
    auto_map), built here from the facts rather than with evods' exporter: q/k/v fused per KV group."""
    from safetensors.torch import save_file

    folder.mkdir()
    published = {}
    for i in range(INTERNLM2_MODEL["num_layers"]):
        layer = f"model.layers.{i}"
        q, k, v = (weights[f"{layer}.self_attn.{x}_proj.weight"].view(4, -1, 4, 32) for x in "qkv")  # (KV, n, d, h)
        published[f"{layer}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, 32)
        for ours, theirs in (("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                             ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
                             ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")):
            published[f"{layer}.{theirs}.weight"] = weights[f"{layer}.{ours}.weight"]
    published.update({"model.tok_embeddings.weight": weights["model.embed_tokens.weight"],
                      "model.norm.weight": weights["model.norm.weight"], "output.weight": weights["lm_head.weight"]})
    save_file({name: tensor.contiguous() for name, tensor in published.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm", "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 256, "num_attention_heads": 8,
        "num_hidden_layers": 3, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "vocab_size": 512,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))


def train_from_published(folder: str, root: str) -> dict:
    """A training run of model type INTERNLM2 that starts from the HF folder and saves its last step."""
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    cfg = tiny_config(model_type="INTERNLM2", model=INTERNLM2_MODEL,
                      data=dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=2),
                      parallel=dict(pipeline=dict(size=1), zero1=-1), lr_scheduler=dict(total_steps=2, warmup_ratio=0),
                      ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{root}/ckpt", checkpoint_every=2,
                                auto_resume=False,
                                load_ckpt_info=dict(path=folder, content=("model",), ckpt_type="hf")))
    trainer = Trainer(cfg, run_dir=Path(root) / "run")
    module = trainer.engine.engine.module
    # numpy arrays travel by value; tensors would travel as shared memory that dies with this process
    start = {name: tensor.numpy().copy() for name, tensor in module.state_dict().items()}
    losses = [entry["loss"] for entry in trainer.train().history]
    end = {name: tensor.numpy().copy() for name, tensor in module.state_dict().items()}
    trainer.close()
    return {"start": start, "end": end, "losses": losses}


def test_a_published_internlm2_folder_starts_training_and_exports_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from evods.checkpoint.formats.internevo import write_native_checkpoint
    from evods.checkpoint.formats.internevo_layout import NativeLayout

    weights = random_weights(INTERNLM2_MODEL)
    write_published_internlm2(tmp_path / "published", weights)
    run = run_distributed(train_from_published, 1, (str(tmp_path / "published"), str(tmp_path)))[0]
    assert all(torch.equal(torch.from_numpy(run["start"][name]), weights[name]) for name in weights)
    assert len(run["losses"]) == 2 and all(loss > 0 for loss in run["losses"])
    # its checkpoint in the published layout: the trained weights under InternLM's names
    assert convert2hf(["--src", str(tmp_path / "ckpt" / "2"), "--tgt", str(tmp_path / "trained"),
                       "--format", "internlm2"]) == 0
    trained = load_through_ckpt_info(tmp_path / "trained", "hf", INTERNLM2_MODEL).state_dict()
    assert all(torch.equal(trained[name], torch.from_numpy(run["end"][name])) for name in weights)
    assert not torch.equal(trained["lm_head.weight"], weights["lm_head.weight"])

    model = load_through_ckpt_info(tmp_path / "published", "hf", INTERNLM2_MODEL)

    # the loaded model, saved and exported in the published layout: InternLM's own files come back
    write_native_checkpoint(str(tmp_path / "native"), model.state_dict(), INTERNLM2_MODEL,
                            NativeLayout(tp=1, pp=1, num_layers=3, family="internlm2", mlp_naming="v2", bias=False),
                            step=1)
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "hf"), "--format", "internlm2",
                       "--tokenizer", str(REPO / "tools" / "tokenizer_internlm2.model"),
                       "--chat_template", "internlm2"]) == 0
    theirs, ours = (load_file(tmp_path / name / "model.safetensors") for name in ("published", "hf"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {path.name for path in (tmp_path / "hf").glob("*.py")} == {
        "chat_templates.py", "configuration_internlm.py", "configuration_internlm2.py", "modeling_internlm.py",
        "modeling_internlm2.py", "transformers_compat.py"}
    assert (config["architectures"], config["num_key_value_heads"], config["bias"]) == (["InternLM2ForCausalLM"], 4,
                                                                                        False)

    # the chat tools run both folders (the published one dispatched on its architectures, not its model_type), in
    # InternLM2's ChatML: the published folder's config.json names no template, and InternLM2Config's is ChatML
    for name in TOKENIZER_FILES:
        shutil.copy(tmp_path / "hf" / name, tmp_path / "published" / name)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    for folder in ("hf", "published"):
        served, _ = load_for_inference(tmp_path / folder, dtype="float32", device="cpu")
        assert type(served).__name__ == "InternLM2ForCausalLM" and served.config.chat_template == "internlm2"
        assert torch.allclose(logits_of(served, ids), logits_of(model, ids), atol=1e-5, rtol=0)
