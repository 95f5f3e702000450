"""evods' packed data in your own training loop (accelerate, transformers' Trainer, plain torch).

    from evods.data import PackedLoader, collate_hf, packed_dataset

    dataset = packed_dataset("data/train", seq_len=2048, micro_bsz=1)   # a train_folder: <type>/*.bin(.meta)
    dataset = packed_dataset(hf_dataset, seq_len=2048, micro_bsz=1)     # a datasets.Dataset / IterableDataset of text
    loader = PackedLoader(dataset, micro_num=4, rank=rank, world=world)  # train_ds.py's data order for this rank
    for batch in loader:             # one micro-batch, micro_num per optimizer step
        loss = model(**batch).loss   # {"input_ids", "position_ids", "labels", "shift_labels"}, each [1, P]
    state = loader.state_dict()      # resume: PackedLoader(...).load_state_dict(state)

The packs, their order and the sampler are train_ds.py's (evods.data.packing, evods.data.sampler), so a loop fed by
PackedLoader sees exactly the tokens train_ds.py trains on; the batches are transformers' (evods.data.collate.hf_batch)
and any causal LM that reads packed position_ids takes them. A map-style packed dataset also works with any other
sampler, e.g. transformers' Trainer with `data_collator=collate_hf`.
"""
from pathlib import Path

from evods.data.collate import hf_batch
from evods.data.errors import DataError
from evods.data.hf_source import StreamingPacks, TextEncoder
from evods.data.loader import StreamingTrainLoader, TrainLoader, folder_packs, pack_hf_dataset
from evods.data.sampler import StaticBatchSampler


def packed_dataset(source, seq_len: int, micro_bsz: int, *, pack_sample_into_one: bool = False, min_length: int = 0,
                   tokenizer=None, text_key: str = "text", add_bos: bool = False, add_eos: bool = False):
    """Packs of micro_bsz * seq_len tokens (dicts of int64 arrays: input_ids, position_ids, labels, type_ids).

    `source`: a train_folder (str or Path: <type>/**/*.bin with their .meta, as data.train_folder), a
    `datasets.Dataset` of text (tokenized once, then packed and shuffled exactly as the same text in a .bin file:
    a map-style torch Dataset), or a `datasets.IterableDataset` (tokenized and packed as it streams, in its order: a
    torch IterableDataset). Text is read from the `text_key` column and encoded with `tokenizer` (a SentencePiece
    model; default tools/V7_sft.model) as tools/tokenizer.py does, with optional BOS/EOS.
    """
    if isinstance(source, (str, Path)):
        return folder_packs(source, seq_len, micro_bsz, pack_sample_into_one, min_length, min_length_dict=None)[0]
    if not hasattr(source, "column_names"):
        raise DataError(f"packed_dataset takes a train_folder path or a datasets.Dataset / IterableDataset, not a "
                        f"{type(source).__name__}")
    encoder = TextEncoder(tokenizer, text_key, add_bos, add_eos, where="the dataset")
    return pack_hf_dataset(source, encoder, seq_len, micro_bsz, pack_sample_into_one, min_length)


class PackedLoader:
    """The micro-batches one data-parallel rank trains on, in train_ds.py's order, as transformers batches [1, P].

    Each optimizer step takes `micro_num` micro-batches (one pack each); rank `rank` of `world` data-parallel ranks
    reads what train_ds.py's rank would. `state_dict()` describes the micro-batches handed out so far (also inside a
    step); a new loader that loads it continues with the next one. `num_workers` > 0 reads packs in worker processes
    (map-style datasets only).
    """

    def __init__(self, dataset, micro_num: int, rank: int = 0, world: int = 1, num_workers: int = 0):
        self.micro_num = micro_num
        if isinstance(dataset, StreamingPacks):
            self._steps = StreamingTrainLoader(dataset, micro_num, rank, world)
        else:
            self._steps = TrainLoader(dataset, StaticBatchSampler(len(dataset), micro_num, None, rank, world),
                                      num_workers)
        self._micro = 0  # micro-batches of the current step already handed out
        self._step_start = self._steps.state_dict()  # the position before the current step

    def __iter__(self):
        steps = iter(self._steps)
        while True:
            step_start = self._steps.state_dict()
            batch = hf_batch(next(steps))
            for row in range(self._micro, self.micro_num):
                self._step_start, self._micro = step_start, row + 1
                yield {name: tensor[row:row + 1] for name, tensor in batch.items()}
            self._micro = 0

    def state_dict(self) -> dict:
        if 0 < self._micro < self.micro_num:
            return {"steps": self._step_start, "micro_batches_in_step": self._micro}
        return {"steps": self._steps.state_dict(), "micro_batches_in_step": 0}

    def load_state_dict(self, state: dict) -> None:
        self._steps.load_state_dict(state["steps"])
        self._micro = state["micro_batches_in_step"]
