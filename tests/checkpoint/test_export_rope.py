"""The RoPE of an exported folder as readers that know only the Llama schema get it (issue: exports that serving
engines read right): config.json read as a `LlamaConfig` by transformers 4.36.2, 4.44.2 and the installed 5.x — what
vLLM, SGLang and LMDeploy do with InternLM's and Llama's configs — gives, at lengths below and past
max_position_embeddings, the cos/sin tables evods trained with and generates with: InternLM's dynamic NTK, a
non-default base, plain RoPE, Llama 3.1's scaling, for the InternLM and the Llama export; and every export's
generation_config.json ends a reply at the chat's end ids."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import evods.model  # noqa: F401  (registers InternLM with AutoConfig)
from evods.model.modeling_internlm import InternLMRotaryEmbedding
from testkit import compat_env
from testkit.chat_models import tiny_export

MAX_POS = 32
MODEL = dict(hidden_size=32, num_layers=1, num_attention_heads=4, vocab_size=103168, mlp_ratio=2,
             max_position_embeddings=MAX_POS)
LENGTHS = [16, MAX_POS, MAX_POS + 1, 2 * MAX_POS, 3 * MAX_POS + 5]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# case -> (InternEvo's rope_base, convert2hf options, the model's rope_scaling); each is exported in both layouts
CASES = {
    "dynamic": (10000, [], None),  # InternLM v1's: dynamic NTK with factor 1
    "dynamic2_base1e6": (1e6, ["--scaling_factor", "2"], None),
    "origin_base5e5": (5e5, ["--rotary_type", "origin"], None),
    # trained with Llama 3.1's scaling (model type LLAMA2's rope_scaling), exported as trained; transformers reads it
    # from 4.43 on
    "llama3_base5e5": (5e5, [], LLAMA3),
}
EXPORTS = {f"{layout}_{case}": (case, ["--format", layout]) for layout in ("internlm", "llama") for case in CASES}
# transformers before 4.43 take a rope_scaling factor only above 1 (README, "After training"), and no llama3 scaling
FACTOR_1 = ("internlm_dynamic", "llama_dynamic")
LLAMA3_SCALED = ("internlm_llama3_base5e5", "llama_llama3_base5e5")

READ_AS_LLAMA = compat_env.WITHOUT_EVODS + """
import inspect, json
import torch, transformers
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

folders, lengths, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
NOT_LLAMA = ("model_type", "architectures", "auto_map", "transformers_version")
takes_config = "config" in inspect.signature(modeling_llama.LlamaRotaryEmbedding.__init__).parameters  # 4.44 on
tables = {}
for name, folder in folders.items():
    config = json.load(open(folder + "/config.json"))
    try:
        config = LlamaConfig(**{key: value for key, value in config.items() if key not in NOT_LLAMA})
    except ValueError as error:
        tables[name] = str(error)
        continue
    tables[name] = {}
    for length in lengths:  # a new embedding per length: 4.x caches the tables of the longest length seen
        x, positions = torch.zeros(1), torch.arange(length)[None]
        if takes_config:
            cos, sin = modeling_llama.LlamaRotaryEmbedding(config=config)(x, positions)
        else:  # 4.36 picks the class from rope_scaling in the attention layer
            cos, sin = modeling_llama.LlamaAttention(config, layer_idx=0).rotary_emb(x, seq_len=length)
        tables[name][length] = (cos.reshape(length, -1), sin.reshape(length, -1))
torch.save({"version": transformers.__version__, "tables": tables}, out)
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    folders = {}
    for name, (case, layout) in EXPORTS.items():
        base, options, rope_scaling = CASES[case]
        model = {**MODEL, "rope_base": base, **({"rope_scaling": rope_scaling} if rope_scaling else {})}
        folders[name] = tiny_export(root / case, model, *options, *layout, name=name)
    compat_env.ensure()
    return folders


def evods_tables(folder, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What evods computes for a sequence of `length` tokens from the InternLM export of the same checkpoint."""
    internlm = folder.parent / folder.name.replace("llama_", "internlm_")
    rope = InternLMRotaryEmbedding(AutoConfig.from_pretrained(internlm))
    cos, sin = rope(torch.arange(length)[None], length)
    return cos[0], sin[0]


@pytest.mark.parametrize("version", ["4.36.2", "4.44.2", None], ids=["4.36.2", "4.44.2", "installed"])
def test_llama_schema_readers_get_the_rope_evods_trained_with(exports, version, tmp_path):
    import transformers

    run = compat_env.run(version, READ_AS_LLAMA, json.dumps({name: str(path) for name, path in exports.items()}),
                         json.dumps(LENGTHS), str(tmp_path / "tables.pt"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "tables.pt")
    assert result["version"] == (version or transformers.__version__)
    for name, folder in exports.items():
        tables = result["tables"][name]
        if version == "4.36.2" and name in FACTOR_1:
            assert "factor field must be a float > 1" in tables, tables
            continue
        if version == "4.36.2" and name in LLAMA3_SCALED:
            assert "`rope_scaling` must be a dictionary with" in tables and "two fields" in tables, tables
            continue
        for length in LENGTHS:
            expected = evods_tables(folder, length)
            for theirs, ours in zip(tables[length], expected):
                torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5, msg=f"{name}, {length} positions")


def test_every_export_carries_the_three_rope_keys_and_the_chat_end_ids(exports):
    for name, folder in exports.items():
        config = json.loads((folder / "config.json").read_text())
        case = EXPORTS[name][0]
        base = CASES[case][0]
        assert config["rope_theta"] == base and config["rope_parameters"]["rope_theta"] == base, name
        if case.startswith("llama3"):
            assert config["rope_scaling"] == LLAMA3, name  # as Llama 3.1's config.json
            assert config["rope_parameters"] == {**LLAMA3, "rope_theta": base}, name
        elif case.startswith("origin"):
            assert config["rope_scaling"] is None and config["rope_parameters"]["rope_type"] == "default", name
        else:
            factor = 2.0 if case.startswith("dynamic2") else 1.0
            assert config["rope_scaling"] == {"type": "dynamic", "factor": factor}, name
            assert config["rope_parameters"] == {"rope_type": "dynamic", "factor": factor, "rope_theta": base}, name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<eoa>")]
        assert "<|Bot|>" in tokenizer.chat_template


def test_a_scaled_rope_export_refuses_another_rotary_type_in_the_chat_tools(exports):
    from evods.inference import InferenceError, load_for_inference

    folder = exports["internlm_llama3_base5e5"]
    with pytest.raises(InferenceError, match=r"^--rotary_type dynamic: .* has RoPE type 'llama3', which only its own "
                                             r"scaling computes; leave --rotary_type out$"):
        load_for_inference(folder, rotary_type="dynamic", device="cpu")
    model, _ = load_for_inference(folder, device="cpu")
    assert model.config.rope.type == "llama3" and model.config.rope.original_max_position_embeddings == 16
