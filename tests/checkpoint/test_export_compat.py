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
