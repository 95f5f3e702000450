"""InternLM's chat API on the evods model (issue: inference people use): `chat` and `stream_chat` build InternLM's chat
prompt (the ids of the exported tokenizer's chat template), stop at <eoa> or EOS, and stream what they return;
transformers' own TextIteratorStreamer works on the model; dynamic NTK switches in place."""
import os
import threading

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

import evods  # noqa: F401  (registers the Auto classes)
from testkit.chat_models import tiny_chat_folder, tiny_model
from testkit.paths import TOKENIZER

torch.set_num_threads(1)

HISTORY = [("Hi", "Hello! 你好"), ("What is 2+2?", "4")]
QUERY = "And 3+3?"
PROMPT = ("<|User|>:Hi<eoh>\n<|Bot|>:Hello! 你好<eoa>\n<|User|>:What is 2+2?<eoh>\n<|Bot|>:4<eoa>\n"
          "<|User|>:And 3+3?<eoh>\n<|Bot|>:")
EOH, EOA = 103027, 103028  # single pieces of V7_sft.model
GREEDY = dict(do_sample=False, max_new_tokens=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("chat") / "hf")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


class ForcedReply(LogitsProcessor):
    """Makes the model say `token_ids` after the prompt, then token 100 forever."""

    def __init__(self, prompt_len: int, token_ids: list[int]):
        self.prompt_len, self.token_ids = prompt_len, token_ids

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -1e9)
        forced[:, self.token_ids[step] if step < len(self.token_ids) else 100] = 0
        return forced


def prompt_ids_of_generate(model, monkeypatch) -> list:
    """Records the input_ids that each `generate` call of `model` receives (and lets the call run)."""
    seen, generate = [], model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return seen


def test_chat_and_stream_chat_prompt_the_internlm_format(model, tokenizer, monkeypatch):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    expected = [1] + sp.encode(PROMPT)
    assert expected.count(EOH) == 3 and expected.count(EOA) == 2
    messages = [{"role": role, "content": text} for query, reply in HISTORY
                for role, text in (("user", query), ("assistant", reply))] + [{"role": "user", "content": QUERY}]
    template_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(template_prompt, add_special_tokens=False).input_ids == expected

    seen = prompt_ids_of_generate(model, monkeypatch)
    reply, history = model.chat(tokenizer, QUERY, HISTORY, **GREEDY)
    assert history == [*HISTORY, (QUERY, reply)]
    for _ in model.stream_chat(tokenizer, QUERY, HISTORY, **GREEDY):
        pass
    assert seen == [expected, expected]


def test_stream_chat_grows_to_the_reply_of_chat(model, tokenizer):
    reply, history = model.chat(tokenizer, QUERY, HISTORY, **GREEDY)
    assert reply and len(tokenizer(reply, add_special_tokens=False).input_ids) >= 8
    streamed = list(model.stream_chat(tokenizer, QUERY, HISTORY, **GREEDY))
    assert len(streamed) >= 3  # it grew in steps
    for (shorter, _), (longer, _) in zip(streamed, streamed[1:]):
        assert longer.startswith(shorter) and longer != shorter
    assert streamed[-1] == (reply, history)


@pytest.mark.parametrize("stop", ["eoa", "eos"])
def test_the_reply_ends_at_eoa_or_eos(model, tokenizer, stop):
    said = tokenizer("Paris is", add_special_tokens=False).input_ids
    prompt_len = model.build_inputs(tokenizer, QUERY, HISTORY)["input_ids"].shape[1]
    force = LogitsProcessorList([ForcedReply(prompt_len, [*said, EOA if stop == "eoa" else 2, *said])])
    reply, _ = model.chat(tokenizer, QUERY, HISTORY, logits_processor=force, **GREEDY)
    assert reply == "Paris is"
    streamed = list(model.stream_chat(tokenizer, QUERY, HISTORY, logits_processor=force, **GREEDY))
    assert streamed[-1][0] == "Paris is"


def test_closing_stream_chat_stops_generation(model, tokenizer):
    chats = model.stream_chat(tokenizer, QUERY, HISTORY, do_sample=False, max_new_tokens=10_000)
    first, _ = next(chats)
    assert first
    chats.close()  # what Ctrl-C in tools/chat.py does
    assert not [thread for thread in threading.enumerate() if thread.name == "stream_chat"]


def test_sampling_settings_reach_generate(model, tokenizer):
    torch.manual_seed(1)
    sampled = model.chat(tokenizer, QUERY, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1,
                         max_new_tokens=12)[0]
    torch.manual_seed(1)
    assert model.chat(tokenizer, QUERY, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1,
                      max_new_tokens=12)[0] == sampled
    assert sampled != model.chat(tokenizer, QUERY, **GREEDY)[0]


def test_text_iterator_streamer_of_transformers_streams_the_model(model, tokenizer):
    """A user's own script: generate in a thread, read transformers' TextIteratorStreamer."""
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=16, min_new_tokens=16)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, do_sample=False,
                                                                  max_new_tokens=16, min_new_tokens=16))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) >= 2
    assert "".join(pieces) == tokenizer.decode(expected[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_dynamic_ntk_switches_in_place():
    model = tiny_model(max_position_embeddings=16)
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dynamic = model(ids[:, :16]).logits, model(ids).logits
        model.set_rotary_type("origin")
        origin = model(ids[:, :16]).logits, model(ids).logits
    assert model.config.rotary["type"] == "origin"
    assert torch.equal(dynamic[0], origin[0])  # within max_position_embeddings: the same RoPE
    assert (dynamic[1] - origin[1]).abs().max() > 1e-3  # past it: another base
    with pytest.raises(ValueError, match="'origin' or 'dynamic'"):
        model.set_rotary_type("linear")


def test_the_readme_snippets_that_load_an_export_run_without_evods_and_without_asking(folder, tmp_path):
    """Where evods is not imported, transformers asks before it runs a folder's code and waits for an answer,
    unless trust_remote_code=True: every README snippet that loads an export passes it, and they run as written."""
    import re
    import subprocess
    import sys

    from testkit.paths import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippets = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "hf/my_model" in block]
    calls = [call for block in snippets for call in re.findall(r"from_pretrained\(([^)]*)\)", block)]
    assert len(calls) >= 4 and all("trust_remote_code=True" in call for call in calls), calls
    # the chat section's two snippets run one after the other (the second uses the first's model and tokenizer); the
    # streamed reply is cut short, the tiny model would write its 1024 tokens
    script = "\n".join(snippets).replace("hf/my_model", str(folder)).replace('"And then?", history)',
                                                                             '"And then?", history, max_new_tokens=8)')
    assert "max_new_tokens=8" in script
    script += "\nimport sys\nassert 'evods' not in sys.modules, 'evods ran, not the folder code'\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Do you wish to run the custom code" not in output
