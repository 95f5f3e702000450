"""Hugging Face `datasets` as a source of training text, tokenized on the fly with the SentencePiece tokenizer and
packed exactly as a bin/meta file is (evods.data.packing); nothing is written as bin/meta.

- `open_hf_dataset`: a `save_to_disk` folder, data files (a parquet, jsonl/json, txt, csv or arrow file, or a folder
  of them) or a Hub name, as a `datasets.Dataset`, or an `IterableDataset` when streaming.
- `TokenizedTexts`: a map-style dataset tokenized once (Dataset.map, cached by datasets) as a packing source with
  `lengths`: the packs, their shuffle (seed 1024) and the sampler are those of the same text in a .bin file.
- `StreamingPacks`: a stream read in order, packed as it comes; a `StreamCursor` (pass, rows read, token offset)
  says where the next pack starts, so resuming skips exactly the rows already consumed.
Texts are encoded as tools/tokenizer.py encodes a jsonl record: the field as it is, empty strings skipped.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evods.data.errors import DataError
from evods.data.packing import build_pack
from evods.data.tokenizer_model import find_tokenizer, load_tokenizer, tokenizer_fingerprint

DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv",
                      ".arrow": "arrow"}
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes at the top of its folder
ENCODE_BATCH = 256


def open_hf_dataset(path, split: str = "train", streaming: bool = False, name: str | None = None):
    """A local or Hub dataset as `datasets.Dataset` (or `IterableDataset` when streaming). DataError if unreadable."""
    import datasets  # slow to import; only the Hugging Face routes need it

    local = Path(path)
    try:
        if local.is_dir() and any((local / f).exists() for f in SAVED_DATASET_FILES):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path} has the splits {sorted(loaded)}, not {split!r}; choose one with split=")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if local.is_dir():  # data files: datasets picks the builder from their extension
            return datasets.load_dataset(str(local), name, split=split, streaming=streaming)
        if local.is_file():
            builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: not a data file datasets reads ({', '.join(DATA_FILE_BUILDERS)})")
            return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=streaming)
        if local.is_absolute() or str(path).startswith((".", "~")):
            raise DataError(f"{path}: no such file or folder")
        return datasets.load_dataset(str(path), name, split=split, streaming=streaming)  # a Hub name
    except DataError:
        raise
    except Exception as err:  # datasets raises many unrelated types for unreadable or unreachable input
        raise DataError(f"{path}: cannot open it as a Hugging Face dataset: {str(err).splitlines()[0]}") from None


class TextEncoder:
    """Batches of records -> token id lists, as tools/tokenizer.py encodes a jsonl field."""

    def __init__(self, tokenizer_path=None, text_key: str = "text", add_bos: bool = False, add_eos: bool = False,
                 where: str = "the dataset", threads: int = 1):
        self.tokenizer_path = find_tokenizer(tokenizer_path)
        self.sp = load_tokenizer(self.tokenizer_path)
        self.text_key = text_key
        self.add_bos, self.add_eos = add_bos, add_eos
        self.where = where
        self.threads = threads

    def check_columns(self, columns) -> None:
        if columns is not None and self.text_key not in columns:
            raise DataError(f"{self.where} has no column {self.text_key!r} (its columns: {', '.join(columns)}); "
                            "choose the text column with text_key (--text_key)")

    def encode(self, batch: dict) -> list[list[int] | None]:
        """One entry per record: its token ids, or None for an empty text (skipped, as blank lines are)."""
        self.check_columns(list(batch))
        texts = batch[self.text_key]
        bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{self.where}: column {self.text_key!r} holds {type(bad).__name__} values, not text; "
                            "choose the text column with text_key (--text_key)")
        keep = [i for i, text in enumerate(texts) if text]
        ids = self.sp.encode([texts[i] for i in keep], add_bos=self.add_bos, add_eos=self.add_eos,
                             num_threads=self.threads)
        encoded = [None] * len(texts)
        for i, tokens in zip(keep, ids):
            encoded[i] = tokens
        return encoded

    def fingerprint(self) -> str:
        """What the tokens depend on besides the dataset: for datasets' cache of Dataset.map."""
        return f"{tokenizer_fingerprint(self.tokenizer_path)}|{self.text_key}|{self.add_bos}|{self.add_eos}"


class TokenizedTexts:
    """A map-style `datasets.Dataset` of text as a packing source (`lengths`, `type_id`, item -> int64 tokens).

    The whole dataset is tokenized once when this is built (datasets caches the result beside a file-backed
    dataset); empty texts are dropped, and so are samples shorter than `min_length`.
    """

    def __init__(self, dataset, encoder: TextEncoder, type_id: int = 0, min_length: int = 0):
        encoder.check_columns(dataset.column_names)
        self.type_id = type_id

        def tokenize(batch):
            kept = [ids for ids in encoder.encode(batch) if ids is not None]
            return {"input_ids": kept, "length": [len(ids) for ids in kept]}

        # datasets cannot hash the SentencePiece processor inside `tokenize`; name the result from what it depends on
        key = hashlib.sha256(f"{dataset._fingerprint}|{encoder.fingerprint()}".encode()).hexdigest()[:16]
        self.tokens = dataset.map(tokenize, batched=True, batch_size=ENCODE_BATCH, remove_columns=dataset.column_names,
                                  new_fingerprint=f"evods-{key}", desc="tokenizing")
        all_lengths = np.asarray(self.tokens["length"], dtype=np.int64)
        self._rows = np.flatnonzero(all_lengths >= min_length)
        self.lengths = all_lengths[self._rows]
        if not len(self._rows):
            raise DataError(f"{encoder.where} has no text to train on (every text is empty or shorter than "
                            f"min_length={min_length})")

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.tokens[int(self._rows[index])]["input_ids"], dtype=np.int64)


@dataclass
class StreamCursor:
    """Where the next pack of a stream starts: in pass `epoch`, at token `offset` of row `rows` (rows before it are
    consumed)."""

    epoch: int = 0
    rows: int = 0
    offset: int = 0


class StreamingPacks(torch.utils.data.IterableDataset):
    """Packs of a text dataset read in order (a `datasets.IterableDataset`, or a `Dataset` read as a stream).

    Windows, labels and positions are those of evods.data.packing over the stream in its own order (no shuffle: a
    stream has no random access); a pack never spans two passes and a pass's tail is dropped, as for a .bin file.
    Iterating yields one pass from the start; `packs(cursor)` yields (pack, cursor after it) endlessly, pass after
    pass, from any cursor.
    """

    def __init__(self, dataset, encoder: TextEncoder, seq_len: int, micro_bsz: int,
                 pack_sample_into_one: bool = False, type_id: int = 0, min_length: int = 0):
        encoder.check_columns(dataset.column_names)
        self.dataset = dataset
        self.encoder = encoder
        self.seq_len = seq_len
        self.pack_len = seq_len * micro_bsz
        self.pack_sample_into_one = pack_sample_into_one
        self.type_id = type_id
        self.min_length = min_length

    def __iter__(self):
        for pack, after in self.packs(StreamCursor()):
            # the pass's last pack leaves the cursor in pass 0 (on the dropped tail), or at the start of pass 1
            if after.epoch > 0 and after != StreamCursor(1, 0, 0):
                return
            yield pack

    def _samples(self, epoch: int, first_row: int):
        """(row number, tokens) of the kept samples of one pass, from row `first_row` on."""
        dataset = self.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if first_row:
            dataset = dataset.skip(first_row)
        row = first_row
        for batch in dataset.iter(batch_size=ENCODE_BATCH):
            for ids in self.encoder.encode(batch):
                if ids is not None and len(ids) >= self.min_length:
                    yield row, np.asarray(ids, dtype=np.int64)
                row += 1

    def packs(self, cursor: StreamCursor):
        P = self.pack_len
        epoch, offset = cursor.epoch, cursor.offset
        first_row = cursor.rows
        while True:
            pending = []  # (row, tokens) of the samples from the one holding the next pack's first token on
            pending_tokens = -offset  # tokens buffered from the next pack's first token on
            lead = offset  # tokens of pending[0] already in earlier packs
            made_any = False
            for row, tokens in self._samples(epoch, first_row):
                pending.append((row, tokens))
                pending_tokens += len(tokens)
                while pending_tokens > P:  # the pack and the token after it (the last label) are buffered
                    pack, pending, lead = self._take_pack(pending, lead)
                    pending_tokens -= P
                    made_any = True
                    rows = pending[0][0] if pending else row + 1
                    yield pack, StreamCursor(epoch, rows, lead)
            if pending_tokens == P:  # the pass ends exactly at a pack's end
                pack, _, _ = self._take_pack(pending, lead)
                made_any = True
                yield pack, StreamCursor(epoch + 1, 0, 0)
            if not made_any and first_row == 0 and offset == 0:
                raise DataError(f"{self.encoder.where} holds fewer than one pack of tokens (micro_bsz * seq_len = "
                                f"{P}); add data or lower micro_bsz / seq_len")
            epoch, first_row, offset = epoch + 1, 0, 0

    def _take_pack(self, pending: list, lead: int):
        """The pack starting at token `lead` of pending[0]; returns (pack, samples left, lead of the first left)."""
        P = self.pack_len
        starts = np.cumsum([0] + [len(tokens) for _, tokens in pending]) - lead
        overlapping = int(np.searchsorted(starts, P, side="left"))  # samples starting before the pack's end
        stream = np.concatenate([tokens for _, tokens in pending[:overlapping + 1]])
        pack = build_pack(stream[lead:lead + P + 1], starts[:overlapping + 1], self.seq_len, P,
                          self.pack_sample_into_one, self.type_id)
        lead += P
        while pending and lead >= len(pending[0][1]):
            lead -= len(pending[0][1])
            pending = pending[1:]
        return pack, pending, lead

