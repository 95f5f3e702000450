"""The InternLM model as a Hugging Face model: generation, save/load, Auto classes, remote code, published configs,
checkpoint mismatches, and the InternEvo model dict / registry."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import evods  # noqa: F401  (registers the Auto classes)
from evods.model import (
    MODEL_INITIALIZER,
    InternLMConfig,
    InternLMForCausalLM,
    InternLMModel,
    Rope,
    config_from_model_dict,
)
from testkit.compat_env import WITHOUT_EVODS
from tests.model.test_model import make_model

torch.set_num_threads(1)

GREEDY = dict(do_sample=False, max_new_tokens=6, pad_token_id=0)


def test_greedy_generation_with_cache_equals_without():
    model = make_model(rotary={"base": 10000, "type": "origin"})
    ids = torch.randint(1, 97, (2, 7))
    with_cache = model.generate(ids, use_cache=True, **GREEDY)
    without_cache = model.generate(ids, use_cache=False, **GREEDY)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_generates_as_rows_alone():
    model = make_model()
    rows = [torch.randint(1, 97, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batch = model.generate(ids, attention_mask=mask, **GREEDY)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **GREEDY)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), i


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = make_model(max_position_embeddings=8)  # dynamic NTK rescales for this input: inv_freq must be right
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 97, (2, 10))
    for loaded in (InternLMForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is InternLMForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
    assert type(AutoConfig.from_pretrained(tmp_path)) is InternLMConfig
    assert type(AutoModel.from_config(model.config)) is InternLMModel


REMOTE_LOAD = WITHOUT_EVODS + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


def test_saved_folder_loads_with_remote_code_without_evods(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_internlm.InternLMConfig",
        "AutoModel": "modeling_internlm.InternLMForCausalLM",  # as InternLM's published folders
        "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
    }
    # The remote code is the model alone (issue: the model file holds the model): its files import the standard
    # library, torch, transformers (flash-attn where installed) and each other: no DeepSpeed, no pipeline stages and
    # nothing else of evods'
    code = {path.name: path.read_text() for path in (tmp_path / "model").glob("*.py")}
    assert set(code) == {"chat_templates.py", "configuration_internlm.py", "modeling_internlm.py",
                         "transformers_compat.py"}
    for name, text in code.items():
        imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                    for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names if not (isinstance(node, ast.ImportFrom) and node.level)}
        roots = {module.split(".")[0] for module in imported}
        assert roots <= set(sys.stdlib_module_names) | {"torch", "transformers", "flash_attn"}, (name, roots)
        assert "deepspeed" not in text.lower() and "Stage(" not in text and "pipeline_layers" not in text, name
    ids = torch.randint(0, 97, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    args = [str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(ids).logits)


PUBLISHED_CONFIG = {
    "architectures": ["InternLMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_internlm.InternLMConfig",
        "AutoModel": "modeling_internlm.InternLMForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
    },
    "bias": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "model_type": "internlm",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-06,
    "rotary": {"base": 10000, "type": "dynamic"},
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.2",
    "use_cache": True,
    "vocab_size": 103168,
}


def test_published_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    for config in (InternLMConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(config) is InternLMConfig
        for key, value in PUBLISHED_CONFIG.items():
            if key not in ("torch_dtype", "transformers_version"):
                assert getattr(config, key) == value, key
        assert config.dtype == torch.bfloat16
        assert config.head_dim == 128


def test_checkpoint_that_disagrees_with_the_config_is_an_error(tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())

    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        InternLMForCausalLM.from_pretrained(tmp_path / "ckpt")

    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "bias": False}))
    with pytest.raises(ValueError, match=r"do not match the config .*unexpected_keys.*q_proj\.bias"):
        InternLMForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_config_from_internevo_model_dict():
    model_dict = dict(
        checkpoint=0.5, num_attention_heads=32, embed_split_hidden=True, vocab_size=103168, embed_grad_scale=1,
        parallel_output=True, hidden_size=4096, num_layers=32, mlp_ratio=8 / 3, apply_post_layer_norm=False,
        dtype="torch.bfloat16", norm_type="rmsnorm", layer_norm_epsilon=1e-5, use_flash_attn=True, num_chunks=1,
    )
    config = config_from_model_dict(model_dict)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 11008, 32)
    assert (config.rms_norm_eps, config.dtype, config.rotary["type"]) == (1e-5, torch.bfloat16, "origin")
    dynamic = config_from_model_dict(dict(hidden_size=64, mlp_ratio=2.5, use_dynamic_ntk_rope=True, rope_base=500))
    assert dynamic.rope == Rope(500, "dynamic", 1.0) and dynamic.intermediate_size == 256
    with pytest.raises(ValueError, match="norm_type='layernorm' is not supported"):
        config_from_model_dict(dict(norm_type="layernorm"))
    with pytest.raises(ValueError, match=r"unknown keys \['hiden_size'\]"):
        config_from_model_dict(dict(hiden_size=64))


def test_registry_builds_internlm_and_rejects_duplicates_and_unknown_names():
    build = MODEL_INITIALIZER.get_module("INTERNLM")
    model = build(hidden_size=32, num_layers=2, num_attention_heads=4, mlp_ratio=2, vocab_size=50, checkpoint=0.5,
                  dtype=torch.bfloat16)
    assert isinstance(model, InternLMForCausalLM) and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    with pytest.raises(ValueError, match="'INTERNLM' is already registered"):
        MODEL_INITIALIZER.register_module("INTERNLM")(lambda **kw: None)
    with pytest.raises(ValueError, match=r"no 'GPT' in MODEL_INITIALIZER; registered: \[.*'INTERNLM'"):
        MODEL_INITIALIZER.get_module("GPT")
