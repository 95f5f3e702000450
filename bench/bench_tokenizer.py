"""Tokenizer throughput (MB/s of input):
- text: evods.data.tokenize at 1 and 2 workers vs InternEvo's approach (one process, sp.encode per line, json.dumps,
  write), on the sample text shipped in samples/;
- chat: tools/chat_tokenizer.py (evods.cli.chat_tokenizer) at 1 and 2 workers on the shipped conversations
  (samples/chat/, as JSONL) repeated to --chat_mb MB, with InternLM's tokenizer and template, a 10% validation split.
Each run's outputs must be byte-identical; a run's time is the whole tool's (the chat tool's includes writing the
tokenizer files, as a user's run does; the tokenizer's one-time conversion, cached per machine, is timed apart).

    python bench/bench_tokenizer.py [--part text|chat|all] [--repeat 90] [--chat_mb 20] [--rounds 3]
"""
import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from evods.checkpoint.formats.hf_tokenizer import CACHE_ENV
from evods.cli.chat_tokenizer import prepare_tokenizer, tokenize_chat
from evods.data.tokenize import tokenize_file

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["samples/pretrain_en/wiki_demo.txt", "samples/pretrain_cn/songci.txt"]
CHAT_SOURCES = ["samples/chat/messages_zh_demo.jsonl", "samples/chat/sharegpt_en_demo.json"]


def baseline(src, out, tokenizer_path):
    """InternEvo's tokenizer.py loop (raw SentencePiece, as in the quickstart)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    meta, offset = [], 0
    with open(src, encoding="utf-8") as lines, open(out, "wb") as bin_file:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            tokens = sp.encode(line)
            data = (json.dumps({"tokens": tokens}) + "\n").encode()
            bin_file.write(data)
            meta.append((offset, len(tokens)))
            offset += len(data)
    np.save(f"{out}.meta", np.array(meta, dtype=np.int32))
    os.replace(f"{out}.meta.npy", f"{out}.meta")


def chat_input(path: Path, megabytes: float) -> None:
    """The shipped conversations as JSONL lines (messages and ShareGPT records), repeated to `megabytes`."""
    lines = []
    for name in CHAT_SOURCES:
        text = (REPO / name).read_text(encoding="utf-8")
        records = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        lines += [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    block = "".join(lines).encode()
    with open(path, "wb") as handle:
        for _ in range(max(1, round(megabytes * 2**20 / len(block)))):
            handle.write(block)


def timed_runs(runs: dict, size_mb: float, work: Path, outputs, rounds: int = 1) -> None:
    """Run each (name -> run(out)) `rounds` times, in turn (so that a burst of load on the machine falls on every
    variant alike), print the median MB/s (and min-max) and its ratio to the first's, and check that outputs are
    identical."""
    rates, results = {name: [] for name in runs}, {}
    for _ in range(rounds):
        for index, (name, run) in enumerate(runs.items()):
            out = work / f"{index}.out"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            run(out)
            rates[name].append(size_mb / (time.perf_counter() - start))
            results.setdefault(name, outputs(out))
    base_rate = None
    for name, measured in rates.items():
        rate = float(np.median(measured))
        base_rate = base_rate or rate
        spread = f" (min {min(measured):.2f}, max {max(measured):.2f}, {rounds} runs)" if rounds > 1 else ""
        print(f"{name:28s} {rate:6.2f} MB/s  x{rate / base_rate:.2f}{spread}")
    assert len(set(results.values())) == 1, "outputs differ"
    print("all outputs byte-identical")


def bench_text(work: Path, repeat: int, tokenizer_path: Path) -> None:
    src = work / "input.txt"
    with open(src, "wb") as handle:
        for _ in range(repeat):
            for name in SOURCES:
                handle.write((REPO / name).read_bytes())
    size_mb = src.stat().st_size / 2**20
    print(f"text: input {size_mb:.1f} MB")
    runs = {"baseline (InternEvo loop)": lambda out: baseline(src, out, tokenizer_path)}
    for workers in (1, 2):
        runs[f"evods workers={workers}"] = lambda out, w=workers: tokenize_file(
            src, out, tokenizer_path, workers=w, progress=False)
    timed_runs(runs, size_mb, work, lambda out: (out.read_bytes(), Path(f"{out}.meta").read_bytes()))


def bench_chat(work: Path, megabytes: float, tokenizer_path: Path, rounds: int) -> None:
    src = work / "chat.jsonl"
    chat_input(src, megabytes)
    size_mb = src.stat().st_size / 2**20
    print(f"chat: input {size_mb:.1f} MB of conversations")
    # the tokenizer's conversion to tokenizer.json happens once per machine (then cached): timed apart, the runs
    # below are those of every later input file
    os.environ[CACHE_ENV] = str(work / "cache")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        prepare_tokenizer(tokenizer_path, None, folder)
    print(f"the tokenizer's first conversion (once per machine, then cached): {time.perf_counter() - start:.1f} s")
    runs = {f"chat tool workers={workers}": lambda out, w=workers: tokenize_chat(
        src, out, tokenizer_path, workers=w, progress=False) for workers in (1, 2)}
    timed_runs(runs, size_mb, work,
               lambda out: tuple((path.relative_to(out), path.read_bytes()) for path in sorted(out.rglob("*.bin*"))),
               rounds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("text", "chat", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=90, help="copies of the sample text in the text input")
    parser.add_argument("--chat_mb", type=float, default=20, help="size of the conversations input")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each chat variant, taken in turn (median)")
    args = parser.parse_args()
    tokenizer_path = REPO / "tools" / "V7_sft.model"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        if args.part in ("text", "all"):
            bench_text(work, args.repeat, tokenizer_path)
        if args.part in ("chat", "all"):
            bench_chat(work, args.chat_mb, tokenizer_path, args.rounds)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
