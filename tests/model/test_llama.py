"""InternEvo's LLAMA2 model type (Llama-2 and Llama-3 shapes) as configuration of the one model core: a tiny model
built from a `model` dict computes what transformers' own `LlamaForCausalLM` computes with the same weights — grouped
KV heads, the RoPE scalings `llama3`, `linear` and `dynamic` (inverse frequencies bit-identical to transformers'
`modeling_rope_utils.py`), an output head tied to the input embedding, packed rows of several documents; its
`--format llama` export loads as `LlamaForCausalLM` with the RoPE under both transformers schemas and the tie kept;
a RoPE or tie evods does not run is one line when the config loads. Tiny fp32 models on CPU."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from evods.checkpoint.formats.internevo import write_native_checkpoint
from evods.checkpoint.formats.internevo_export import NATIVE_MODEL_TYPES
from evods.checkpoint.formats.internevo_layout import AttentionHeads, NativeLayout
from evods.checkpoint.formats.weights import hf_weights, load_weights
from evods.config import ConfigError, load_config
from evods.model import MODEL_INITIALIZER
from tests.model.test_model import assert_close_rel, packed_row
from tools.convert2hf import main as convert2hf

torch.set_num_threads(1)

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
# head_dim 16, base 5e5: wavelengths 6.3 (kept: < 64 / 4), 32.5 (blended) and 168 on (divided: > 64 / 1)
LLAMA3_TIED = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256,
                   mlp_ratio=2.5, multiple_of=32, no_bias=True, rope_base=500000.0, max_position_embeddings=256,
                   rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True, dtype=torch.float32)
CASES = {
    "gqa_llama3_tied": LLAMA3_TIED,
    "linear": {**LLAMA3_TIED, "num_kv_attention_heads": 1, "rope_base": 10000.0, "tie_word_embeddings": False,
               "rope_scaling": dict(rope_type="linear", factor=2.0)},
    # transformers' dynamic NTK for one forward of 40 tokens past max_position_embeddings 32
    "dynamic": {**LLAMA3_TIED, "max_position_embeddings": 32, "tie_word_embeddings": False,
                "rope_scaling": dict(rope_type="dynamic", factor=2.0)},
}
LENGTH = 40


def llama2_model(model_dict: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_INITIALIZER.get_module("LLAMA2")(**model_dict).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def transformers_llama(model_dict: dict, state: dict) -> LlamaForCausalLM:
    """transformers' Llama written from the `model` dict directly, in transformers' own spelling."""
    config = LlamaConfig(
        vocab_size=model_dict["vocab_size"], hidden_size=model_dict["hidden_size"], intermediate_size=160,
        num_hidden_layers=model_dict["num_layers"], num_attention_heads=model_dict["num_attention_heads"],
        num_key_value_heads=model_dict["num_kv_attention_heads"], rms_norm_eps=1e-5,
        max_position_embeddings=model_dict["max_position_embeddings"], attention_bias=False,
        tie_word_embeddings=model_dict["tie_word_embeddings"],
        rope_parameters={**model_dict["rope_scaling"], "rope_theta": model_dict["rope_base"]})
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(state)
    return llama


@pytest.mark.parametrize("case", CASES)
def test_llama2_logits_equal_transformers_llama(case):
    model_dict = CASES[case]
    model = llama2_model(model_dict)
    assert model.config.intermediate_size == 160  # int(64 * 2.5) rounded up to InternEvo's multiple_of
    llama = transformers_llama(model_dict, model.state_dict())
    tied = model_dict["tie_word_embeddings"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied

    rope_type = model_dict["rope_scaling"]["rope_type"]
    seq_len = LENGTH if rope_type == "dynamic" else None
    expected_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](llama.config, None, seq_len=seq_len)
    rotary = model.model.rotary_emb
    actual_inv_freq = rotary.inv_freq_for_base(rotary.base_for_length(LENGTH))
    assert attention_factor == 1.0 and torch.equal(actual_inv_freq, expected_inv_freq)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model_dict["vocab_size"], (2, LENGTH), generator=generator)
    packed_ids, positions = packed_row([17, 5, 18], model_dict["vocab_size"], generator)
    with torch.no_grad():
        assert_close_rel(model(ids).logits, llama(ids).logits)
        if rope_type != "dynamic":  # dynamic NTK's base depends on the longest document: one per forward here
            packed = model(packed_ids[None], position_ids=positions[None]).logits[0]
            documents = [llama(doc[None]).logits[0] for doc in packed_ids.split([17, 5, 18])]
            assert_close_rel(packed, torch.cat(documents))


def test_llama3_export_loads_as_transformers_llama_with_both_rope_schemas_and_the_tie(tmp_path):
    """The model as InternEvo's LLAMA2 native files (split wq/wk/wv, tensor-parallel 2), exported with
    tools/convert2hf.py --format llama."""
    model = llama2_model(LLAMA3_TIED)
    heads = AttentionHeads(4, 2, 16)
    write_native_checkpoint(str(tmp_path / "native"), model.state_dict(), LLAMA3_TIED,
                            NativeLayout(tp=2, pp=1, num_layers=2, family=NATIVE_MODEL_TYPES["LLAMA2"], bias=False,
                                         heads=heads, mlp_naming="v2"), step=1)
    folder = tmp_path / "hf"
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(folder), "--format", "llama"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_scaling"] == LLAMA3_SCALING  # transformers 4.43-4.x (and vLLM, SGLang, LMDeploy)
    assert config["rope_parameters"] == {**LLAMA3_SCALING, "rope_theta": 500000.0}  # transformers 5
    assert config["rope_theta"] == 500000.0 and config["num_key_value_heads"] == 2
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # one copy of the tied weight

    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    exported = llama.state_dict()
    assert all(torch.equal(exported[name], tensor) for name, tensor in model.state_dict().items())
    # the folder's weights back into a LLAMA2 model, as a run starting from it (ckpt_type="hf") reads them
    started = MODEL_INITIALIZER.get_module("LLAMA2")(**LLAMA3_TIED)
    load_weights(started, hf_weights(str(folder)), str(folder))
    assert started.lm_head.weight is started.model.embed_tokens.weight
    assert all(torch.equal(exported[name], tensor) for name, tensor in started.state_dict().items())
    ids = torch.randint(0, 256, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_rel(llama(ids).logits, model(ids).logits)
    # a scaled RoPE is exported as trained: replacing it is refused, nothing written
    assert convert2hf(["--src", str(tmp_path / "native"), "--tgt", str(tmp_path / "other"), "--format", "llama",
                       "--rotary_type", "dynamic"]) != 0
    assert not (tmp_path / "other").exists()


TINY = """\
model_type = "LLAMA2"
data = dict(seq_len=16, micro_num=2, micro_bsz=1, total_steps=10)
model = dict(num_attention_heads=4, num_kv_attention_heads=2, hidden_size=32, num_layers=2, vocab_size=64,
             mlp_ratio=8 / 3, no_bias=True, dtype="torch.float32", {extra})
ckpt = dict(enable_save_ckpt=False)
{parallel}
"""


@pytest.mark.parametrize("extra, parallel, message", [
    ('rope_scaling=dict(rope_type="yarn", factor=4.0)', "",
     r"cfg\.py:\d+: model\.rope_scaling=\{'rope_type': 'yarn', 'factor': 4\.0\}: rope_scaling type 'yarn' is not "
     r"supported; use one of \('default', 'dynamic', 'linear', 'llama3'\) \(or no rope_scaling\)"),
    ('rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0)', "",
     r"cfg\.py:\d+: model\.rope_scaling=.*: RoPE type 'llama3' needs factor, low_freq_factor, high_freq_factor, "
     r"original_max_position_embeddings; \['high_freq_factor', 'original_max_position_embeddings'\] missing"),
    ('rope_scaling=dict(rope_type="linear", factor=2.0), use_dynamic_ntk_rope=True', "",
     r"cfg\.py:\d+: model\.rope_scaling=\{'rope_type': 'linear', 'factor': 2\.0\} with use_dynamic_ntk_rope=True: "
     r"give one of the two"),
    # tied under tensor parallelism: the embedding splits by vocabulary rows, as the head does (issue 25)
    ("tie_word_embeddings=True, embed_split_hidden=True", "parallel = dict(tensor=2)",
     r"cfg\.py:\d+: model\.tie_word_embeddings=True at parallel\.tensor size 2 needs "
     r"model\.embed_split_hidden=False: the tied embedding is split by vocabulary rows, as the output head is"),
    ("tie_word_embeddings=True", "parallel = dict(zero1=dict(size=-1, fsdp=True))",
     r"cfg\.py:\d+: model\.tie_word_embeddings=True is not supported with ZeRO stage 3"),
])
def test_llama2_config_refusals_are_one_line(tmp_path, extra, parallel, message):
    path = tmp_path / "cfg.py"
    path.write_text(TINY.format(extra=extra, parallel=parallel))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value) and re.search(message, str(caught.value)), str(caught.value)


def test_llama2_config_with_llama3_rope_and_tie_loads_and_builds(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(TINY.format(extra=f"rope_base=500000.0, tie_word_embeddings=True, rope_scaling={LLAMA3_SCALING}",
                                parallel="parallel = dict(zero1=dict(size=-1), zero=dict(stage=2))"))
    cfg = load_config(path)
    model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict)
    assert model.config.rope.type == "llama3" and model.config.rope.original_max_position_embeddings == 64
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_key_value_heads == 2 and model.config.bias is False
