"""Alpaca SFT data to train/valid bin/meta pairs: the logic behind tools/alpaca_tokenizer.py.

Sample layout: [BOS] + -(encode(user) + [<eoh>, <0x0A>]) + -encode("<|Bot|>:") + encode(output) + [<eoa>, <0x0A>],
cut to MAX_LENGTH - 1, then [EOS]. Negative ids are masked from the loss. Special ids are looked up by piece;
InternEvo's tools/alpaca_tokenizer.py hard-codes <eoh>=103167 and <eoa>=103166 instead, which in V7_sft.model are
unused pieces (the real ones are 103027 and 103028): `internevo_special_ids=True` writes those, for bins
byte-identical to InternEvo's.
Unlike upstream, the validation split is drawn without replacement, so it has exactly int(N * split_ratio) samples.
"""
from pathlib import Path

from evods.data.errors import DataError
from evods.data.hf_source import open_hf_dataset
from evods.data.splits import SplitWriters, split_paths, validation_mask
from evods.data.tokenizer_model import load_tokenizer

MAX_LENGTH = 2048
BOT_PREFIX = "<|Bot|>:"
INTERNEVO_SPECIAL_IDS = {"<eoh>": 103167, "<eoa>": 103166}  # as tools/alpaca_tokenizer.py in InternEvo
_ENCODE_BATCH = 1024


def alpaca_query(instruction: str, input_text: str) -> str:
    """The user's turn of an Alpaca record, as InternEvo's tool writes it: the instruction, then the input on its own
    line when there is one."""
    return f"{instruction}\n{input_text}" if input_text else instruction


def load_alpaca_records(path):
    """The Alpaca records via `datasets`: a JSON/JSONL file, or a folder saved with `save_to_disk`."""
    if not Path(path).exists():
        raise DataError(f"Alpaca dataset {path} not found")
    return open_hf_dataset(path)


def _piece_id(sp, piece):
    piece_id = sp.piece_to_id(piece)
    if piece_id == sp.unk_id():
        raise DataError(f"the tokenizer has no {piece!r} piece; use InternLM's V7_sft.model")
    return piece_id


class AlpacaTemplate:
    """The InternLM chat template of alpaca_tokenizer.py, with special ids taken from the tokenizer (or InternEvo's
    hard-coded ones)."""

    def __init__(self, sp, internevo_special_ids: bool = False):
        self.sp = sp
        special = INTERNEVO_SPECIAL_IDS if internevo_special_ids else {p: _piece_id(sp, p) for p in ("<eoh>", "<eoa>")}
        self.eoh, self.eoa = special["<eoh>"], special["<eoa>"]
        self.newline = _piece_id(sp, "<0x0A>")
        self.bot_ids = [-i for i in sp.encode(BOT_PREFIX)]

    def encode(self, instructions, inputs, outputs) -> list[list[int]]:
        """Token lists for a batch of records given as columns."""
        users = self.sp.encode(["<|User|>:" + alpaca_query(i or "", x or "") for i, x in zip(instructions, inputs)])
        responses = self.sp.encode([o or "" for o in outputs])
        samples = []
        for user, response in zip(users, responses):
            ids = [-i for i in user + [self.eoh, self.newline]] + self.bot_ids + response + [self.eoa, self.newline]
            samples.append([self.sp.bos_id()] + ids[:MAX_LENGTH - 2] + [self.sp.eos_id()])
        return samples


def tokenize_alpaca(dataset_path, output_path, tokenizer_path, split_ratio=0.1, overwrite=False,
                    internevo_special_ids=False) -> dict:
    """Write {output}/train/en/dataset.bin(.meta) and {output}/valid/en/dataset.bin(.meta); return sample counts.

    A split with no samples is not written.
    """
    records = load_alpaca_records(dataset_path)
    if len(records) == 0:
        raise DataError(f"{dataset_path} has no records; nothing was written")
    missing = {"instruction", "input", "output"} - set(records.column_names)
    if missing:
        raise DataError(f"{dataset_path}: records lack the Alpaca field(s) {sorted(missing)}")
    template = AlpacaTemplate(load_tokenizer(tokenizer_path), internevo_special_ids)
    is_valid = validation_mask(len(records), split_ratio)
    counts = {"train": int((~is_valid).sum()), "valid": int(is_valid.sum())}
    writers = SplitWriters(split_paths(output_path, "en", "dataset.bin"), counts, overwrite)
    try:
        start = 0
        for batch in records.iter(batch_size=_ENCODE_BATCH):
            samples = template.encode(batch["instruction"], batch["input"], batch["output"])
            flags = is_valid[start:start + len(samples)]
            start += len(samples)
            for name, wanted in (("train", False), ("valid", True)):
                writers.write(name, [sample for sample, flag in zip(samples, flags) if flag == wanted])
        writers.commit()
    except BaseException:
        writers.abort()
        raise
    return counts
