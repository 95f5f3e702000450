"""tools/serve.py on a folder from tools/convert2hf.py, driven by the official `openai` client over 127.0.0.1 (issue:
an OpenAI-compatible endpoint): chat and text completions, streamed and not, give the greedy text of the model's own
`chat` and `generate`; `stop`, `max_tokens`, `seed` and the usage counts are right; dynamic NTK runs as exported;
four concurrent clients each get their own answer; bad requests get their status codes and the server still answers
after them; another host than 127.0.0.1 needs an API key."""
import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from evods.inference.server import StopStrings
from evods.model import InternLMForCausalLM
from evods.model.chat_templates import INTERNLM, stop_token_ids
from testkit.chat_models import tiny_export
from testkit.paths import REPO

MODEL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=103168, mlp_ratio=2,
             max_position_embeddings=64)
KEY, NAME, START_TIMEOUT = "test-key", "tiny", 180
QUESTIONS = ["Hello", "What is 2+2?", "你好", "Tell me about Paris"]
CONTEXT = 4 * MODEL["max_position_embeddings"]  # dynamic NTK: the server's default context


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("serve"), MODEL)


@contextlib.contextmanager
def running_server(folder, log):
    """The /v1 address of tools/serve.py on `folder`, run as a user starts it, with an API key."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "serve.py"), "--model", str(folder), "--served_model_name", NAME,
             "--port", "0", "--api_key", KEY], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (address := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        while True:
            try:
                httpx.get(address[1].removesuffix("/v1") + "/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield address[1]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with running_server(folder, tmp_path_factory.mktemp("serve_log") / "server.log") as address:
        yield address


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(folder):
    torch.set_num_threads(1)
    return InternLMForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def chat(client, question: str, stream: bool = False, **options) -> tuple[str, object, str]:
    """(the reply, the usage, the finish reason) of one chat completion."""
    messages = [{"role": "user", "content": question}]
    if not stream:
        response = client.chat.completions.create(model=NAME, messages=messages, **options)
        return response.choices[0].message.content, response.usage, response.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return text, chunks[-1].usage, finish[0]


@torch.no_grad()
def expected_chat(reference, question: str, max_new_tokens: int) -> tuple[str, int, int]:
    """(model.chat's greedy reply, prompt tokens, tokens generated up to and including the end id)."""
    model, tokenizer = reference
    reply, _ = model.chat(tokenizer, question, do_sample=False, max_new_tokens=max_new_tokens)
    prompt = model.build_inputs(tokenizer, question)["input_ids"]
    ids = model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_token_ids(INTERNLM, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return reply, prompt.shape[1], ids.shape[1] - prompt.shape[1]


def test_chat_and_completions_give_the_models_own_greedy_text(client, reference):
    model, tokenizer = reference
    assert [(entry.id, entry.max_model_len) for entry in client.models.list().data] == [(NAME, CONTEXT)]
    greedy = dict(temperature=0, max_tokens=24)
    reply, prompt_tokens, generated = expected_chat(reference, "Hello", 24)
    assert len(reply) >= 8
    for stream in (False, True):
        text, usage, finish = chat(client, "Hello", stream, **greedy)
        assert text == reply
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (prompt_tokens, generated, prompt_tokens + generated)
        assert finish == ("length" if generated == 24 else "stop")

    # max_tokens: the first 5 tokens of the same reply
    short = expected_chat(reference, "Hello", 5)[0]
    for stream in (False, True):
        text, usage, finish = chat(client, "Hello", stream, temperature=0, max_tokens=5)
        assert (text, usage.completion_tokens, finish) == (short, 5, "length")

    # stop: the reply ends before the first stop string, which it does not contain
    stop = reply[4:7]
    for stream in (False, True):
        text, usage, finish = chat(client, "Hello", stream, stop=[stop, "never said"], **greedy)
        assert (text, finish) == (reply[:reply.index(stop)], "stop")
        assert usage.completion_tokens <= generated

    # a text completion: BOS and the prompt, then generate's greedy tokens up to an end id
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=stop_token_ids(INTERNLM, tokenizer),
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    stop_ids = stop_token_ids(INTERNLM, tokenizer)
    expected = tokenizer.decode([t for t in out if t not in stop_ids], skip_special_tokens=True)
    response = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12)
    assert response.choices[0].text == expected and response.usage.prompt_tokens == ids.shape[1]
    assert response.usage.completion_tokens == len(out)
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected

    # sampling: the same seed, the same text
    sampled = [chat(client, "Hello", temperature=1.0, top_p=0.9, max_tokens=16, seed=7)[0] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != reply[:len(sampled[0])]


def test_dynamic_ntk_runs_as_exported_past_max_position_embeddings(client, reference):
    model, _ = reference
    question = "Summarize: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 5)
    reply, prompt_tokens, generated = expected_chat(reference, question, 30)
    assert prompt_tokens + generated > MODEL["max_position_embeddings"]
    text, usage, _ = chat(client, question, temperature=0, max_tokens=30)
    assert (text, usage.prompt_tokens) == (reply, prompt_tokens)
    model.set_rotary_type("origin")
    try:
        assert expected_chat(reference, question, 30)[0] != reply  # the RoPE past 64 positions decided the text
    finally:
        model.set_rotary_type("dynamic")


def test_four_concurrent_clients_each_get_their_own_answer(client, reference):
    expected = [expected_chat(reference, question, 20)[0] for question in QUESTIONS]
    answers, errors = [None] * len(QUESTIONS), []
    start = threading.Barrier(len(QUESTIONS))

    def ask(index: int) -> None:
        try:
            start.wait()
            answers[index] = chat(client, QUESTIONS[index], stream=index % 2 == 1, temperature=0, max_tokens=20)[0]
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and answers == expected


def test_bad_requests_get_their_status_and_the_server_still_answers(client, server, reference):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{server}/chat/completions", content=b'{"model": "tiny", "messages": [', headers=headers)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    wrong_type = httpx.post(f"{server}/chat/completions", json={"model": NAME, "messages": "hi"}, headers=headers)
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hello"}])
    with pytest.raises(openai.BadRequestError, match=f"context is {CONTEXT} tokens.*max_tokens"):
        chat(client, "Hello", max_tokens=CONTEXT)
    with pytest.raises(openai.BadRequestError, match="context is"):
        chat(client, "word " * CONTEXT, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        chat(client, "Hello", n=2)
    with pytest.raises(openai.BadRequestError, match="roles are system, user and assistant"):
        client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/models").status_code == 401
    # and then it answers as before
    assert chat(client, "Hello", temperature=0, max_tokens=24)[0] == expected_chat(reference, "Hello", 24)[0]


def test_a_llama_export_is_served_with_the_same_text(folder, reference, tmp_path):
    """`--format llama` (transformers' LlamaForCausalLM, the same chat template and end ids) computes what the
    InternLM layout does: the same greedy replies. (Within max_position_embeddings: past it, transformers' dynamic
    NTK keeps cached keys at the base they were rotated with, where InternLM's code rotates them again.)"""
    llama = tiny_export(folder.parent, MODEL, "--format", "llama", name="llama")
    with running_server(llama, tmp_path / "server.log") as address:
        client = openai.OpenAI(base_url=address, api_key=KEY, max_retries=0, timeout=120)
        assert client.models.list().data[0].max_model_len == CONTEXT  # its rope_parameters say dynamic NTK
        for question in QUESTIONS[:2]:
            assert chat(client, question, temperature=0, max_tokens=24)[0] == \
                expected_chat(reference, question, 24)[0]


def test_other_hosts_need_an_api_key(capsys, monkeypatch):
    from evods.cli.serve import main

    monkeypatch.delenv("EVODS_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_code:
        main(["--model", "hf/anything", "--host", "0.0.0.0"])
    assert exit_code.value.code == 2 and "give an --api_key" in capsys.readouterr().err


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["ab", "xyz"])
    assert stops.feed("12a") == ("12", False)  # "a" may start "ab"
    assert stops.feed("c x") == ("ac ", False)
    assert stops.feed("yz!") == ("", True)  # "xyz" met: nothing of it is given out
    tail = StopStrings(["ab"])
    assert tail.feed("1a") == ("1", False) and tail.flush() == "a"  # the reply ended: the held "a" belongs to it
