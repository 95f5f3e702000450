"""Packing samples into fixed rows of micro_bsz * seq_len tokens, vectorised per pack (InternEvo's
PackedDatasetWithCut and PackedDatasetWithoutCuSeqlen in internlm/data/tokenized/packed_dataset.py).

The shuffled samples form one token stream (seed 1024); pack i is the window [i*P, (i+1)*P) and the tail is dropped.
Each pack is a dict of int64 arrays of length P:
- input_ids: abs(token);
- labels: the next token of the same document if it is > 0, else -100 (document ends, masked prompt tokens, <unk>).
  At a pack's end a document that goes on keeps its next token as label with pack_sample_into_one=False
  (PackedDatasetWithCut), and gets -100 with True (PackedDatasetWithoutCuSeqlen labels each fragment on its own);
- position_ids: pack_sample_into_one=False: restart at 0 at every document fragment and every seq_len tokens inside
  a fragment longer than seq_len; True: 0..seq_len-1 repeated micro_bsz times (attention crosses documents);
- type_ids: the source's type id.
`build_pack` makes one pack from a window of the stream; PackedDataset (random access over a source with known
lengths) and evods.data.hf_source.StreamingPacks (a stream read in order) both call it.
"""
import numpy as np
from torch.utils.data import Dataset

PACK_SEED = 1024
IGNORE_INDEX = -100


def next_token_labels(next_tokens: np.ndarray) -> np.ndarray:
    """Loss targets from next tokens: non-positive ids (masked, padding, <unk>) are not predicted."""
    return np.where(next_tokens > 0, next_tokens, IGNORE_INDEX)


def build_pack(window: np.ndarray, bounds: np.ndarray, seq_len: int, pack_len: int, pack_sample_into_one: bool,
               type_id: int) -> dict:
    """One pack from `window`, the stream from the pack's first token on (pack_len tokens, plus the next one when the
    stream has it), and `bounds`, the window positions where the samples overlapping the pack start, followed by
    where the last of them ends (the first start is <= 0, the end is >= pack_len)."""
    P = pack_len
    tokens = window[:P]
    next_tokens = np.zeros(P, dtype=np.int64)
    tail = window[1:P + 1]
    next_tokens[:len(tail)] = tail
    labels = next_token_labels(next_tokens)
    doc_ends = bounds[1:] - 1  # pack positions of each document's last token
    labels[doc_ends[doc_ends < P]] = IGNORE_INDEX
    if pack_sample_into_one:
        labels[-1] = IGNORE_INDEX
        positions = np.tile(np.arange(seq_len, dtype=np.int64), P // seq_len)
    else:
        frag_starts = np.maximum(bounds[:-1], 0)
        frag_lengths = np.diff(np.append(frag_starts, P))
        positions = (np.arange(P) - np.repeat(frag_starts, frag_lengths)) % seq_len
    return {
        "input_ids": np.abs(tokens),
        "position_ids": positions,
        "labels": labels,
        "type_ids": np.full(P, type_id, dtype=np.int64),
    }


class PackedDataset(Dataset):
    """Packs of one source: anything with `lengths` (int array), `type_id` and `source[i] -> int64 token array`."""

    def __init__(self, source, seq_len: int, micro_bsz: int, pack_sample_into_one: bool = False):
        self.source = source
        self.seq_len = seq_len
        self.pack_len = seq_len * micro_bsz
        self.pack_sample_into_one = pack_sample_into_one
        self.order = np.arange(len(source))
        np.random.RandomState(PACK_SEED).shuffle(self.order)
        # cum[k] = stream position where the k-th shuffled sample starts
        self.cum = np.concatenate([[0], np.cumsum(source.lengths[self.order], dtype=np.int64)])

    def __len__(self):
        return int(self.cum[-1] // self.pack_len)

    def __getitem__(self, index) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pack {index} out of range ({len(self)} packs)")
        P = self.pack_len
        start = index * P
        first = int(np.searchsorted(self.cum, start, side="right")) - 1  # sample holding token `start`
        last = int(np.searchsorted(self.cum, start + P, side="left")) - 1  # sample holding token `start + P - 1`
        stream = np.concatenate([self.source[int(i)] for i in self.order[first:last + 1]])
        offset = start - self.cum[first]
        return build_pack(stream[offset:offset + P + 1], self.cum[first:last + 2] - start, self.seq_len, P,
                          self.pack_sample_into_one, self.source.type_id)
