"""InternEvo's data rules as small references for the parity tests, written apart from evods' implementation.

Checked once against InternEvo's own classes (InternLM/InternEvo at c628a8c: StaticBatchSampler in
internlm/data/tokenized/batch_sampler.py, driven as train.py's load_new_batch drives it; PackedDatasetWithoutCuSeqlen
in internlm/data/tokenized/packed_dataset.py with packed_collate_fn): same batches and labels for every case the tests
use.
"""
import numpy as np


class TooMuchRampup(Exception):
    """InternEvo's assertion "Too much rampup samples"."""


def internevo_batches(num_samples: int, micro_num: int, rampup: str, dp_rank: int, dp_size: int,
                      count: int, seed: int = 1024) -> list[list[int]]:
    """The first `count` batches data-parallel rank `dp_rank` reads: each pass is one iteration of InternEvo's
    sampler, re-entered when its DataLoader ends (batch_count runs on across passes)."""
    start, incr, every = map(int, rampup.split()) if rampup else (micro_num, micro_num, 1)
    ramp_steps = (micro_num - start) // incr
    rng = np.random.RandomState(seed)
    batch_count, batches = 0, []
    while True:
        # get_indices: during the ramp-up it reserves the ramp-up's samples, then whole micro_num * dp groups
        group = micro_num * dp_size
        if batch_count < ramp_steps * every:
            reserved = sum(start + i * incr for i in range(ramp_steps)) * every * dp_size
            if reserved > num_samples:
                raise TooMuchRampup(f"{reserved} > {num_samples}")
            used = (num_samples - reserved) // group * group + reserved
        else:
            used = num_samples // group * group
        order = np.arange(num_samples)
        rng.shuffle(order)
        if used < micro_num:
            raise ValueError("The number of samples should be larger than batch_size")
        # __iter__: this rank's share, in batches of the ramp-up size; the pass's last batch may be short
        share, taken = order[:used][dp_rank::dp_size], 0
        while taken < len(share):
            size = min(start + batch_count // every * incr, micro_num)
            batches.append(share[taken:taken + size].tolist())
            taken += size
            batch_count += 1
            if len(batches) == count:
                return batches


def internevo_pack_into_one(docs: list[list[int]], seq_len: int, micro_bsz: int) -> list[dict]:
    """Packs of pack_sample_into_one=True after InternEvo's collate: the documents shuffled with seed 1024 form one
    stream cut into windows of seq_len * micro_bsz tokens; each document fragment in a window is labelled with its own
    next tokens and -100 after its last token, also where the document goes on in the next window."""
    window = seq_len * micro_bsz
    order = np.arange(len(docs))
    np.random.RandomState(1024).shuffle(order)
    stream_ends = np.cumsum([len(docs[i]) for i in order])
    packs = []
    for first in range(0, int(stream_ends[-1]) // window * window, window):
        tokens, labels = [], []
        for doc, end in zip(order, stream_ends):
            begin = end - len(docs[doc])
            lo, hi = max(first, begin), min(first + window, end)
            if lo < hi:
                fragment = list(docs[doc][lo - begin:hi - begin])
                tokens += fragment
                labels += fragment[1:] + [-100]
        packs.append({"input_ids": [abs(t) for t in tokens], "labels": [t if t > 0 else -100 for t in labels]})
    return packs
