"""Batches as fixed-shape LongTensors, and the log-line statistics derived from them
(InternEvo's packed_collate_fn and the fields of its log line).

Every batch is {"input_ids", "position_ids", "labels", "type_ids"}, each LongTensor [rows, length]: train rows are
packs ([micro_num, micro_bsz * seq_len]), validation rows are single documents ([batch, seq_len]). Document
boundaries are where position_ids == 0 (no cu_seqlens, so a DeepSpeed pipeline can ship the tensors between stages).
Here `labels` are already shifted (labels[t] is the target of position t); `hf_batch` gives transformers' layout.
"""
import numpy as np
import torch

from evods.data.packing import IGNORE_INDEX, next_token_labels

FIELDS = ("input_ids", "position_ids", "labels", "type_ids")


def collate_packs(packs: list[dict], fields=FIELDS) -> dict:
    return {name: torch.from_numpy(np.stack([pack[name] for pack in packs])) for name in fields}


def hf_batch(batch: dict) -> dict:
    """A training batch as transformers' causal LMs take it, for the evods model and e.g. LlamaForCausalLM alike:

    - labels: unshifted (labels[t] is token t when a loss is taken on it; the model shifts them), -100 at each row's
      first token, each document's first token and every masked token;
    - shift_labels: the same targets already shifted (shift_labels[t] is what position t predicts). transformers'
      causal-LM loss uses them when present, and counts them in Trainer's num_items_in_batch. They hold one target
      `labels` cannot: a document cut by the row's end keeps its next token (the first of the next pack) as the last
      position's target, as train_ds.py trains it;
    - position_ids restart at 0 for every document, which both models read as the document boundaries.
    No type_ids (transformers' models take no such input).
    """
    shift_labels = batch["labels"]
    labels = torch.full_like(shift_labels, IGNORE_INDEX)
    labels[:, 1:] = shift_labels[:, :-1]
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": labels,
            "shift_labels": shift_labels}


def collate_hf(packs: list[dict]) -> dict:
    """Packs (items of a packed dataset) -> one transformers batch (see hf_batch): a `collate_fn` / `data_collator`.
    Reads only input_ids, position_ids and labels (transformers' Trainer drops item keys its model does not take)."""
    return hf_batch(collate_packs(packs, fields=("input_ids", "position_ids", "labels")))


def collate_documents(documents: list[np.ndarray], seq_len: int) -> dict:
    """Validation: one document per row, cut to seq_len and right-padded (input 0, label -100)."""
    batch = {name: np.zeros((len(documents), seq_len), dtype=np.int64) for name in FIELDS}
    batch["labels"].fill(IGNORE_INDEX)
    batch["position_ids"][:] = np.arange(seq_len)
    for row, tokens in enumerate(documents):
        tokens = tokens[:seq_len]
        batch["input_ids"][row, :len(tokens)] = np.abs(tokens)
        batch["labels"][row, :len(tokens) - 1] = next_token_labels(tokens[1:])
    return {name: torch.from_numpy(array) for name, array in batch.items()}


def batch_stats(position_ids: torch.Tensor) -> dict:
    """num_samples_in_batch (segments in the step), largest_length (longest segment), largest_batch /
    smallest_batch (most / fewest segments in one micro-batch); a segment starts where position_ids == 0."""
    starts = position_ids.numpy() == 0
    rows, length = starts.shape
    flat_starts = np.flatnonzero(starts)  # row 0 of every row is a start, so no segment spans two rows
    per_row = starts.sum(axis=1)
    return {
        "num_samples_in_batch": int(per_row.sum()),
        "largest_length": int(np.diff(np.append(flat_starts, rows * length)).max()),
        "largest_batch": int(per_row.max()),
        "smallest_batch": int(per_row.min()),
    }
