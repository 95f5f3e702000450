"""tools/serve.py against the model's own `generate`: tokens/s of one streamed request (goal >= 0.9x of `generate` on
the same folder), and four concurrent streamed clients: total tokens/s, time to first token and request latency
(p50/p95).

    OMP_NUM_THREADS=2 python bench/bench_serve.py

A folder like an export (hidden 512, 8 layers, 8 heads, InternLM's 103,168-token vocabulary and tokenizer, fp32), a
128-token prompt (a Wikipedia sample), 128 new tokens, greedy; the server's requests set `ignore_eos` so that both
sides make all 128. `generate` runs in this process and the server in its own, with the same threads, taking turns
(median of ROUNDS): load from other work hits them alike. Both times include the prompt's forward.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evods.model import InternLMForCausalLM  # noqa: E402
from testkit.chat_models import tiny_chat_folder  # noqa: E402  (a folder as the export writes it)
from testkit.paths import DATA, REPO  # noqa: E402

SIZES = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             max_position_embeddings=2048)
PROMPT_TOKENS, NEW_TOKENS, ROUNDS, CLIENTS, CONCURRENT_ROUNDS = 128, 128, 3, 4, 3
THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))


def start_server(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--model", str(folder),
                                "--served_model_name", "bench", "--port", "0"], stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    while not (address := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
        if process.poll() is not None:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return process, address[1]


@torch.no_grad()
def direct_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    output = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            pad_token_id=2)
    seconds = time.perf_counter() - start
    assert output.shape[1] - ids.shape[1] == NEW_TOKENS
    return seconds


def streamed(client, prompt: str) -> tuple[float, float, int]:
    """(seconds to the last token, seconds to the first, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, usage = None, None
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    return time.perf_counter() - start, first, usage.completion_tokens


def concurrent_round(client, prompt: str) -> tuple[float, list[tuple[float, float, int]]]:
    """(wall seconds, each client's `streamed` result) of CLIENTS requests sent at once."""
    results = [None] * CLIENTS

    def ask(index: int) -> None:
        results[index] = streamed(client, prompt)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as temp:
        folder = tiny_chat_folder(Path(temp) / "hf", **SIZES)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = (DATA / "pretrain_en" / "wiki_demo.txt").read_text(encoding="utf-8")[:4000]
        prompt = tokenizer.decode(tokenizer(text)["input_ids"][1:PROMPT_TOKENS])  # BOS + 127 tokens of text
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        model = InternLMForCausalLM.from_pretrained(folder).eval()
        server, address = start_server(folder, Path(temp) / "server.log")
        try:
            client = openai.OpenAI(base_url=address, api_key="none", max_retries=0, timeout=600)
            streamed(client, prompt)  # warm-up of both
            direct_seconds(model, ids)
            direct, served = [], []
            for _ in range(ROUNDS):
                direct.append(NEW_TOKENS / direct_seconds(model, ids))
                seconds, _, tokens = streamed(client, prompt)
                assert tokens == NEW_TOKENS
                served.append(tokens / seconds)
            latencies, firsts, totals = [], [], []
            for _ in range(CONCURRENT_ROUNDS):
                seconds, results = concurrent_round(client, prompt)
                totals.append(sum(tokens for _, _, tokens in results) / seconds)
                latencies += [seconds for seconds, _, _ in results]
                firsts += [first for _, first, _ in results]
        finally:
            server.terminate()
            server.wait(timeout=60)
    ours, theirs = statistics.median(served), statistics.median(direct)
    print(f"torch {torch.__version__}, {THREADS} threads, hidden {SIZES['hidden_size']}, "
          f"{SIZES['num_hidden_layers']} layers, vocab {model.config.vocab_size}, prompt {ids.shape[1]} tokens, "
          f"{NEW_TOKENS} new, median of {ROUNDS} rounds")
    print(f"\n| one request, greedy | tokens/s | vs generate |\n|---|---|---|\n| `generate` | {theirs:.1f} | 1.00x |"
          f"\n| evods-serve, streamed | {ours:.1f} | {ours / theirs:.2f}x |")
    print(f"\n| {CLIENTS} concurrent streamed clients ({CONCURRENT_ROUNDS} rounds, {len(latencies)} requests) "
          f"| value |\n|---|---|"
          f"\n| total tokens/s (median of rounds) | {statistics.median(totals):.1f} |"
          f"\n| time to first token p50 / p95 | {percentile(firsts, 0.5):.2f} s / {percentile(firsts, 0.95):.2f} s |"
          f"\n| request latency p50 / p95 | {percentile(latencies, 0.5):.2f} s / {percentile(latencies, 0.95):.2f} s |")


if __name__ == "__main__":
    main()
