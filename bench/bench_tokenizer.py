"""Tokenizer throughput (MB/s of input text): evods.data.tokenize at 1 and 2 workers vs InternEvo's approach
(one process, sp.encode per line, json.dumps, write), on the sample text shipped in samples/; all outputs must be
identical.

    python bench/bench_tokenizer.py [--repeat 3]
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

from evods.data.tokenize import tokenize_file

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["samples/pretrain_en/wiki_demo.txt", "samples/pretrain_cn/songci.txt"]


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=90, help="copies of the sample text in the input")
    args = parser.parse_args()
    tokenizer_path = REPO / "tools" / "V7_sft.model"
    work = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        src = work / "input.txt"
        with open(src, "wb") as handle:
            for _ in range(args.repeat):
                for name in SOURCES:
                    handle.write((REPO / name).read_bytes())
        size_mb = src.stat().st_size / 2**20
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; input {size_mb:.1f} MB")
        runs = {"baseline (InternEvo loop)": lambda out: baseline(src, out, tokenizer_path)}
        for workers in (1, 2):
            runs[f"evods workers={workers}"] = lambda out, w=workers: tokenize_file(
                src, out, tokenizer_path, workers=w, progress=False)
        results, base_rate = {}, None
        for name, run in runs.items():
            out = work / f"{len(results)}.bin"
            start = time.perf_counter()
            run(out)
            rate = size_mb / (time.perf_counter() - start)
            base_rate = base_rate or rate
            results[name] = (out.read_bytes(), Path(f"{out}.meta").read_bytes())
            print(f"{name:28s} {rate:6.2f} MB/s  x{rate / base_rate:.2f}")
        assert len(set(results.values())) == 1, "outputs differ"
        print("all outputs byte-identical")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
