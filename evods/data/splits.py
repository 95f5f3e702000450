"""Train and validation splits of the fine-tuning tools (tools/alpaca_tokenizer.py, tools/chat_tokenizer.py): which
records go to validation, and the pair of bin/meta files each split is written to."""
from pathlib import Path

import numpy as np

from evods.data.binfile import BinWriter, meta_path
from evods.data.errors import DataError

SPLIT_SEED = 0
SPLITS = ("train", "valid")


def validation_mask(num_samples: int, split_ratio: float) -> np.ndarray:
    """True for the records of the validation split: int(N * ratio) distinct ones, the same for every run
    (InternEvo's tool draws them with replacement)."""
    if not 0 <= split_ratio < 1:
        raise DataError(f"--split_ratio must be in [0, 1), not {split_ratio}")
    is_valid = np.zeros(num_samples, dtype=bool)
    is_valid[np.random.RandomState(SPLIT_SEED).permutation(num_samples)[:int(num_samples * split_ratio)]] = True
    return is_valid


def split_paths(output_path, type_name: str, file_name: str) -> dict[str, Path]:
    """{output}/train/{type}/{file} and {output}/valid/{type}/{file}: type folders as training reads them."""
    return {split: Path(output_path) / split / type_name / file_name for split in SPLITS}


class SplitWriters:
    """One BinWriter per split that is expected to get samples (`planned` counts); a split that ends without samples
    is not written, and with `overwrite` an earlier run's pair there is removed (it would be read as this data's)."""

    def __init__(self, paths: dict[str, Path], planned: dict[str, int], overwrite: bool):
        self.paths, self.overwrite = paths, overwrite
        mode = "overwrite" if overwrite else "create"
        self.writers: dict[str, BinWriter] = {}
        try:
            for split, path in paths.items():
                if planned[split]:
                    self.writers[split] = BinWriter(path, mode)
        except BaseException:
            self.abort()
            raise

    def write(self, split: str, token_lists) -> None:
        if token_lists:
            self.writers[split].write(token_lists)

    def write_formatted(self, split: str, blob: bytes, line_bytes: np.ndarray, token_counts: np.ndarray) -> None:
        if len(line_bytes):
            self.writers[split].write_formatted(blob, line_bytes, token_counts)

    def samples(self, split: str) -> int:
        return self.writers[split].num_samples if split in self.writers else 0

    def commit(self) -> None:
        for split, path in self.paths.items():
            writer = self.writers.get(split)
            if writer is not None and writer.num_samples:
                writer.commit()
                continue
            if writer is not None:
                writer.abort()
            if self.overwrite:
                for stale in (path, meta_path(path)):
                    stale.unlink(missing_ok=True)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
