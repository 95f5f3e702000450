"""A folder from tools/convert2hf.py, loaded where evods is not installed, by transformers 4.36.2 and 4.44.2 in their
own environment (testkit/compat_env.py) and by the installed 5.x, with trust_remote_code=True: the same logits and
greedy tokens as evods' model (dynamic NTK past max_position_embeddings included), and InternLM's token ids and chat
prompt from AutoTokenizer slow and fast (issue: exported models)."""
import json

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer

from testkit import compat_env
from testkit.chat_models import tiny_export
from testkit.paths import TOKENIZER

torch.set_num_threads(1)

TEXTS = [
    "Hello world, 你好",
    "感恩生活中的每一个细节，才能真正体会到幸福的滋味。",
    "def add(a, b):\n    return a + b  # 求和",
    "emoji 😀🚀 and ✨ sparkles",
    "  leading and trailing spaces  ",
    "<eoh> and <eoa> end a turn",
    "数字 1234567890 and 3.14159",
    "mixed\ttabs\nand\n\nnewlines",
    "ÀÉÎÕÜ ñ ß Ω Ж",
    "https://example.com/path?q=1&r=2",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
CHAT_PROMPT = "<s><|System|>:Be brief.\n<|User|>:你好<eoh>\n<|Bot|>:Hello!<eoa>\n<|User|>:2+2?<eoh>\n<|Bot|>:"
PROMPTS = ["The capital of France is", "你好"]  # the second row is left-padded
# A real vocabulary (the tokenizer's ids) on a tiny model; 16 positions, so that 20 new tokens pass the limit.
MODEL = dict(hidden_size=32, num_layers=2, num_attention_heads=4, vocab_size=103168, mlp_ratio=2,
             max_position_embeddings=16, dtype=torch.float32)
GREEDY = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
CHAT_TURN = dict(query="2+2?", history=[["你好", "Hello!"]], chat_greedy=dict(max_new_tokens=8, do_sample=False))

LOAD_EXPORT = compat_env.WITHOUT_EVODS + """
import json
import torch, transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

folder, spec, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
result = {"version": transformers.__version__, "classes": {}, "ids": {}, "chat": {}}
for fast in (False, True):
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=fast)
    kind = "fast" if fast else "slow"
    result["classes"][kind] = type(tokenizer).__name__
    result["ids"][kind] = [tokenizer(text)["input_ids"] for text in spec["texts"]]
    prompt = tokenizer.apply_chat_template(spec["chat"], tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(spec["chat"], add_generation_prompt=True)
    result["chat"][kind] = [prompt, list(ids["input_ids"] if hasattr(ids, "keys") else ids)]  # 5.x: a BatchEncoding
tokenizer.padding_side = "left"
batch = tokenizer(spec["prompts"], return_tensors="pt", padding=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
result["auto_model"] = type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__
with torch.no_grad():
    logits = model(**batch).logits
    generated = model.generate(**batch, **spec["greedy"], pad_token_id=tokenizer.pad_token_id)
    alone = model.generate(**tokenizer(spec["prompts"][:1], return_tensors="pt"), **spec["greedy"])
    # InternLM's chat API from the remote code: its prompt ids, the reply, streamed and not
    turn = (spec["query"], spec["history"])
    reply, history = model.chat(tokenizer, *turn, **spec["chat_greedy"])
    streamed = list(model.stream_chat(tokenizer, *turn, **spec["chat_greedy"]))
    result["model_chat"] = {"prompt_ids": model.build_inputs(tokenizer, *turn)["input_ids"][0].tolist(),
                            "reply": reply, "history": history, "streamed": streamed[-1][0]}
torch.save({"batch": dict(batch), "logits": logits, "generated": generated, "alone": alone}, out + ".pt")
json.dump(result, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An HF folder converted from an InternEvo native checkpoint of a random tiny model, with the tokenizer."""
    folder = tiny_export(tmp_path_factory.mktemp("export"), MODEL)
    compat_env.ensure()
    return folder


@torch.no_grad()
def evods_reference(folder, batch: dict) -> dict:
    from evods.model import InternLMForCausalLM

    model = InternLMForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    turn = (CHAT_TURN["query"], [tuple(pair) for pair in CHAT_TURN["history"]])
    return {"chat_prompt_ids": model.build_inputs(tokenizer, *turn)["input_ids"][0].tolist(),
            "chat_reply": model.chat(tokenizer, *turn, **CHAT_TURN["chat_greedy"])[0],
            "logits": model(**batch).logits,
            "generated": model.generate(**batch, **GREEDY, pad_token_id=2),
            "alone": model.generate(batch["input_ids"][:1, batch["attention_mask"][0].bool()], **GREEDY)}


@pytest.mark.parametrize("version", ["4.36.2", "4.44.2", None], ids=["4.36.2", "4.44.2", "installed"])
def test_the_export_loads_and_generates_as_evods_without_evods(exported, version, tmp_path):
    import transformers

    spec = json.dumps({"texts": TEXTS, "chat": CHAT, "prompts": PROMPTS, "greedy": GREEDY, **CHAT_TURN})
    run = compat_env.run(version, LOAD_EXPORT, str(exported), spec, str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["version"] == (version or transformers.__version__)
    assert result["auto_model"] == "InternLMForCausalLM"

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    expected_ids = [[1] + sp.encode(text) for text in TEXTS]
    # transformers 5 has one Llama tokenizer class, backed by `tokenizers`, for both
    assert result["classes"] == {"slow": "LlamaTokenizer", "fast": "LlamaTokenizer" if version is None else
                                 "LlamaTokenizerFast"}
    for kind, ids in result["ids"].items():
        assert ids == expected_ids, kind
    for kind, (prompt, ids) in result["chat"].items():
        assert prompt == CHAT_PROMPT and ids == [1] + sp.encode(CHAT_PROMPT[len("<s>"):]), kind

    theirs = torch.load(tmp_path / "out.pt")
    ours = evods_reference(exported, theirs["batch"])
    chat = result["model_chat"]
    prompt = "<|User|>:你好<eoh>\n<|Bot|>:Hello!<eoa>\n<|User|>:2+2?<eoh>\n<|Bot|>:"
    assert chat["prompt_ids"] == [1] + sp.encode(prompt)
    assert chat["prompt_ids"] == ours["chat_prompt_ids"]
    assert chat["reply"] == chat["streamed"] == ours["chat_reply"] and chat["reply"]
    assert chat["history"] == [*CHAT_TURN["history"], [CHAT_TURN["query"], chat["reply"]]]
    real = theirs["batch"]["attention_mask"].bool()  # logits of padding positions mean nothing
    assert (theirs["logits"] - ours["logits"])[real].abs().max() <= 1e-5
    assert theirs["generated"].shape[1] == real.shape[1] + 20 > MODEL["max_position_embeddings"]
    assert torch.equal(theirs["generated"], ours["generated"])
    assert torch.equal(theirs["alone"], ours["alone"])


# Grouped-query attention in the remote code (issue: InternLM2): 4 query heads on 2 KV heads, no biases, RoPE base 1e6
# with dynamic NTK (factor 2) past max_position_embeddings; a padded batch, greedy decoding with the cache past it.
GQA_CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bias=False, max_position_embeddings=16, rope_theta=1e6,
                  rope_scaling={"type": "dynamic", "factor": 2.0})
LOAD_GQA = compat_env.WITHOUT_EVODS + """
import torch, transformers
from transformers import AutoModelForCausalLM

folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = torch.load(folder + "/batch.pt")
with torch.no_grad():
    logits = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
torch.save({"version": transformers.__version__, "logits": logits, "generated": generated}, out)
"""


# The published InternLM2 layout (modeling_internlm2.py): the names and config keys of InternLM's InternLM2ForCausalLM
INTERNLM2_NAMES = {"model.tok_embeddings.weight", "model.layers.1.attention.wqkv.weight",
                   "model.layers.1.attention.wo.weight", "model.layers.1.feed_forward.w1.weight",
                   "model.layers.1.feed_forward.w3.weight", "model.layers.1.feed_forward.w2.weight",
                   "model.layers.1.attention_norm.weight", "model.layers.1.ffn_norm.weight", "model.norm.weight",
                   "output.weight"}


@pytest.mark.parametrize("layout", ["internlm", "internlm2"])
@pytest.mark.parametrize("version", ["4.36.2", "4.44.2", None], ids=["4.36.2", "4.44.2", "installed"])
def test_a_grouped_query_export_loads_and_generates_as_evods_without_evods(version, layout, tmp_path):
    import json

    import transformers
    from safetensors.torch import load_file

    from evods.model import InternLM2Config, InternLM2ForCausalLM, InternLMConfig, InternLMForCausalLM

    torch.manual_seed(0)
    classes = {"internlm": (InternLMConfig, InternLMForCausalLM), "internlm2": (InternLM2Config, InternLM2ForCausalLM)}
    config_class, model_class = classes[layout]
    model = model_class(config_class(**GQA_CONFIG)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    if layout == "internlm2":
        assert INTERNLM2_NAMES <= load_file(tmp_path / "hf" / "model.safetensors").keys()
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert (config["architectures"], config["model_type"], config["attn_implementation"]) == (
            ["InternLM2ForCausalLM"], "internlm2", "eager")
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
        assert (config["bias"], config["num_key_value_heads"], config["rope_theta"], config["rope_scaling"]) == (
            False, 2, 1e6, {"type": "dynamic", "factor": 2.0})
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, :3] = 0  # left padding
    torch.save(batch, tmp_path / "hf" / "batch.pt")
    compat_env.ensure()
    run = compat_env.run(version, LOAD_GQA, str(tmp_path / "hf"), str(tmp_path / "out.pt"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["version"] == (version or transformers.__version__)
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    real = batch["attention_mask"].bool()
    assert (theirs["logits"] - logits)[real].abs().max() <= 1e-5
    assert generated.shape[1] == 28 > GQA_CONFIG["max_position_embeddings"]
    assert torch.equal(theirs["generated"], generated)
