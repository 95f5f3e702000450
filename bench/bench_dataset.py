"""Dataset opening time, RSS while iterating an epoch, and packing throughput, on a generated >= 1 GB bin/meta
pair in /tmp (deleted afterwards).

    python bench/bench_dataset.py [--gb 1.1] [--epoch_packs N]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from evods.data.binfile import BinWriter, TokenizedDataset, format_bin_lines
from evods.data.packing import PackedDataset
from evods.data.sampler import StaticBatchSampler

SEQ_LEN, MICRO_BSZ = 2048, 4


def rss_mb():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def generate(path, gigabytes):
    """Random documents of 50..8000 tokens; one 32 MB block of lines written repeatedly (fast to generate)."""
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 103000, size=rng.randint(50, 8000)).tolist() for _ in range(600)]
    block = format_bin_lines(docs)
    with BinWriter(path) as writer:
        while writer.num_bytes < gigabytes * 2**30:
            writer.write_formatted(*block)
        writer.commit()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.1)
    parser.add_argument("--epoch_packs", type=int, default=0, help="packs to iterate (default: the whole epoch)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ds_"))
    try:
        path = work / "en" / "big.bin"
        start = time.perf_counter()
        generate(path, args.gb)
        print(f"generated {path.stat().st_size / 2**30:.2f} GB in {time.perf_counter() - start:.0f} s")
        before = rss_mb()
        start = time.perf_counter()
        source = TokenizedDataset(path)
        packed = PackedDataset(source, SEQ_LEN, MICRO_BSZ)
        sampler = StaticBatchSampler(len(packed), micro_num=4)
        print(f"open (meta, consistency check, pack index, sampler): {time.perf_counter() - start:.3f} s; "
              f"{len(source)} samples, {int(source.lengths.sum())} tokens, {len(packed)} packs")
        packs = args.epoch_packs or len(packed)
        tokens, peak = 0, dict(before)
        start = time.perf_counter()
        for step, batch in enumerate(iter(sampler)):
            for index in batch:
                tokens += len(packed[index]["input_ids"])
            if step % 200 == 0:
                peak = {k: max(v, rss_mb()[k]) for k, v in peak.items()}
            if tokens >= packs * packed.pack_len:
                break
        seconds = time.perf_counter() - start
        peak = {k: max(v, rss_mb()[k]) for k, v in peak.items()}
        print(f"iterated {tokens / packed.pack_len:.0f} packs: {tokens / seconds / 1e6:.2f} M tokens/s (one process)")
        print(f"RSS growth: anonymous {peak['RssAnon'] - before['RssAnon']:.0f} MB, "
              f"file-backed {peak['RssFile'] - before['RssFile']:.0f} MB")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
