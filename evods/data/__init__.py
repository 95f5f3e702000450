"""The data pipeline: bin/meta files, packing, sampling and batches for training (see evods.data.loader), and the
public face for your own training loop (evods.data.api: packed_dataset, PackedLoader, collate_hf)."""
from evods.data.api import PackedLoader, packed_dataset
from evods.data.binfile import BinWriter, TokenizedDataset, format_bin_lines
from evods.data.collate import batch_stats, collate_documents, collate_hf, collate_packs, hf_batch
from evods.data.errors import DataError
from evods.data.hf_source import open_hf_dataset
from evods.data.loader import build_train_dataset, build_train_loader, build_valid_loaders, discover_train_files
from evods.data.packing import IGNORE_INDEX, PackedDataset
from evods.data.random_data import RandomDataset
from evods.data.sampler import BatchSkipper, StaticBatchSampler

__all__ = [
    "BatchSkipper", "BinWriter", "DataError", "IGNORE_INDEX", "PackedDataset", "PackedLoader", "RandomDataset",
    "StaticBatchSampler", "TokenizedDataset", "batch_stats", "build_train_dataset", "build_train_loader",
    "build_valid_loaders", "collate_documents", "collate_hf", "collate_packs", "discover_train_files",
    "format_bin_lines", "hf_batch", "open_hf_dataset", "packed_dataset",
]
