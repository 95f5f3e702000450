"""The data pipeline: bin/meta files, packing, sampling and batches for training (see evods.data.loader), and the
public face for your own training loop (evods.data.api: packed_dataset, PackedLoader, collate_hf)."""
from evods.data.api import PackedLoader, packed_dataset
from evods.data.binfile import BinWriter, TokenizedDataset, format_bin_lines
from evods.data.collate import batch_stats, collate_documents, collate_hf, collate_packs, hf_batch
from evods.data.errors import DataError
from evods.data.hf_source import open_hf_dataset
from evods.data.loader import (
    DataSettings,
    build_train_dataset,
    build_train_loader,
    build_valid_loaders,
    discover_train_files,
)
from evods.data.packing import IGNORE_INDEX, PackedDataset
from evods.data.random_data import RandomDataset
from evods.data.sampler import BatchSkipper, Rampup, StaticBatchSampler, parse_rampup, parse_skip_batches
from evods.data.tokenizer_model import check_tokenizer_fits, find_tokenizer, load_tokenizer

__all__ = [
    "BatchSkipper", "BinWriter", "DataError", "DataSettings", "IGNORE_INDEX", "PackedDataset", "PackedLoader",
    "RandomDataset", "Rampup", "StaticBatchSampler", "TokenizedDataset", "batch_stats", "build_train_dataset",
    "build_train_loader", "build_valid_loaders", "check_tokenizer_fits", "collate_documents", "collate_hf",
    "collate_packs", "discover_train_files", "find_tokenizer", "format_bin_lines", "hf_batch", "load_tokenizer",
    "open_hf_dataset", "packed_dataset", "parse_rampup", "parse_skip_batches",
]
