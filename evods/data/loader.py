"""The entry points the training loop calls: build_train_loader and build_valid_loaders, from the config's `data`
section as it is (`DataSettings`: evods.config's DataConfig, with its defaults and checks applied).

Train folder layout: train_folder/<type>/**/*.bin, each with its .bin.meta. Type ids follow InternEvo's
current rule: the sorted names of train_folder's top-level folders, enumerated (e.g. cn=0, code=1, en=2); any name
works. Each .bin is packed on its own (own shuffle, own dropped tail), then all packs are concatenated.
Without train_folder the packs come from RandomDataset(1_000_000, seq_len) and dataset_types is ["en", "cn", "code"].
With train_dataset (instead of train_folder) the text of a Hugging Face dataset is tokenized on the fly (see
evods.data.hf_source): a map-style dataset is packed and sampled exactly as a .bin file, a streaming one in order.
"""
import os
import signal
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader

from evods.data.binfile import TokenizedDataset
from evods.data.collate import collate_documents, collate_packs
from evods.data.errors import DataError
from evods.data.hf_source import StreamCursor, StreamingPacks, TextEncoder, TokenizedTexts, open_hf_dataset
from evods.data.packing import PackedDataset
from evods.data.random_data import RandomDataset
from evods.data.sampler import Rampup, StaticBatchSampler

RANDOM_TRAIN_SAMPLES = 1_000_000
RANDOM_VALID_SAMPLES_PER_RANK = 500
RANDOM_DATASET_TYPES = ["en", "cn", "code"]
VALID_MIN_LENGTH = 50  # InternEvo's JsonlDataset default, which validation sets keep


class TextDatasetSettings(Protocol):
    """data.train_dataset (evods.config's TrainDatasetConfig): the text of a Hugging Face dataset."""

    path: str
    split: str
    streaming: bool
    name: str | None
    tokenizer_path: str | None
    text_key: str
    add_bos: bool
    add_eos: bool


class DataSettings(Protocol):
    """What the loaders read of a training config's `data` section (evods.config's DataConfig)."""

    seq_len: int
    micro_bsz: int
    micro_num: int
    valid_micro_num: int
    pack_sample_into_one: bool
    min_length: int
    min_length_dict: dict | None
    train_folder: str | None
    train_dataset: TextDatasetSettings | None
    valid_folder: str | None
    rampup: Rampup | None


def _bin_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [Path(root) / name for name in sorted(files) if name.endswith(".bin")]
    return found


def discover_train_files(train_folder) -> tuple[list[str], list[tuple[Path, int]]]:
    """(dataset_types in id order, [(bin path, type id)]) for train_folder/<type>/**/*.bin."""
    folder = Path(train_folder)
    if not folder.is_dir():
        raise DataError(f"train_folder {folder} is not a folder ({folder.resolve()}); create it "
                        "with tools/tokenizer.py, or drop data.train_folder to train on random data")
    dataset_types = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    loose = [path for path in _bin_files(folder) if path.parent == folder]
    if loose:
        raise DataError(f"{loose[0]} is directly in train_folder; put .bin files in a type folder such as "
                        f"{folder}/en/ or {folder}/cn/")
    files = [(path, type_id) for type_id, name in enumerate(dataset_types) for path in _bin_files(folder / name)]
    if not files:
        raise DataError(f"no .bin files under {folder}/<type>/; create them with tools/tokenizer.py")
    return dataset_types, files


def min_length_for(path, min_length: int, min_length_dict: dict | None) -> int:
    """min_length_dict {substring: min_len} overrides min_length for paths containing the substring."""
    matches = [key for key in (min_length_dict or {}) if key in str(path)]
    if len(matches) > 1:
        raise DataError(f"{path} matches several min_length_dict keys {matches}; make them match at most one")
    return min_length_dict[matches[0]] if matches else min_length


def pack_hf_dataset(dataset, encoder: TextEncoder, seq_len: int, micro_bsz: int, pack_sample_into_one: bool = False,
                    min_length: int = 0):
    """The packs of a `datasets.Dataset` (random access, as a .bin file) or `IterableDataset` (StreamingPacks)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return StreamingPacks(dataset, encoder, seq_len, micro_bsz, pack_sample_into_one, min_length=min_length)
    return PackedDataset(TokenizedTexts(dataset, encoder, min_length=min_length), seq_len, micro_bsz,
                         pack_sample_into_one)


def build_hf_train_dataset(data: DataSettings):
    """data.train_dataset: (packs, [type name]); the one type is named after the dataset."""
    spec = data.train_dataset
    dataset = open_hf_dataset(spec.path, spec.split, spec.streaming, spec.name)
    encoder = TextEncoder(spec.tokenizer_path, spec.text_key, spec.add_bos, spec.add_eos,
                          f"data.train_dataset {spec.path}")
    packs = pack_hf_dataset(dataset, encoder, data.seq_len, data.micro_bsz, data.pack_sample_into_one, data.min_length)
    return packs, [Path(spec.path).stem]


def folder_packs(train_folder, seq_len: int, micro_bsz: int, pack_sample_into_one: bool, min_length: int,
                 min_length_dict: dict | None) -> tuple[ConcatDataset, list[str]]:
    """The packs of a train_folder (<type>/**/*.bin with their .meta), and its type names in id order."""
    dataset_types, files = discover_train_files(train_folder)
    sources = [TokenizedDataset(path, type_id, min_length_for(path, min_length, min_length_dict))
               for path, type_id in files]
    return _packed(sources, seq_len, micro_bsz, pack_sample_into_one), dataset_types


def _packed(sources, seq_len: int, micro_bsz: int, pack_sample_into_one: bool) -> ConcatDataset:
    """Each source packed on its own (own shuffle, own dropped tail), then concatenated."""
    return ConcatDataset([PackedDataset(source, seq_len, micro_bsz, pack_sample_into_one) for source in sources])


def build_train_dataset(data: DataSettings) -> tuple[ConcatDataset, list[str]]:
    """All packs of the training data, and dataset_types (type names in id order)."""
    if data.train_dataset:
        return build_hf_train_dataset(data)
    if data.train_folder:
        return folder_packs(data.train_folder, data.seq_len, data.micro_bsz, data.pack_sample_into_one,
                            data.min_length, data.min_length_dict)
    random_source = RandomDataset(RANDOM_TRAIN_SAMPLES, data.seq_len)
    return _packed([random_source], data.seq_len, data.micro_bsz, data.pack_sample_into_one), list(RANDOM_DATASET_TYPES)


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the training process: launchers signal the whole process tree (and
    Ctrl-C the whole process group), and a worker killed by it would fail the loader while the rank saves its stop
    checkpoint. Workers still exit with their rank (torch's loader watches its parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainLoader:
    """Endless iterable of training batches (see evods.data.collate); each batch handed out advances the sampler,
    so `sampler.state_dict()` always describes the batches the training loop has consumed."""

    def __init__(self, dataset, sampler: StaticBatchSampler, num_workers: int = 0):
        self.sampler = sampler
        self._loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_packs, num_workers=num_workers,
                                  persistent_workers=False, worker_init_fn=ignore_stop_signals)

    def __iter__(self):
        for batch in self._loader:
            self.sampler.advance()
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class StreamingTrainLoader:
    """Endless training batches from StreamingPacks, with TrainLoader's interface (it is its own "sampler").

    A step takes the next micro_num * dp_size packs of the stream; data rank r keeps packs r, r + dp_size, ... of
    them, as StaticBatchSampler deals its indices. Every rank reads and tokenizes the whole stream, so after each
    step all ranks stand at the same place of it: the state is one StreamCursor, valid for any data-parallel size.
    """

    def __init__(self, packs: StreamingPacks, micro_num: int, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.packs = packs
        self.micro_num = micro_num
        self.data_rank, self.data_world_size = dp_rank, dp_size
        self.cursor = StreamCursor()
        self.batch_count = 0

    def __iter__(self):
        stream = self.packs.packs(self.cursor)
        while True:
            mine = []
            for index in range(self.micro_num * self.data_world_size):
                pack, cursor = next(stream)
                if index % self.data_world_size == self.data_rank:
                    mine.append(pack)
            self.cursor = cursor
            self.batch_count += 1
            yield collate_packs(mine)

    def state_dict(self) -> dict:
        return {"stream": asdict(self.cursor), "batch_count": self.batch_count,
                "data_world_size": self.data_world_size, "pack_len": self.packs.pack_len}

    def load_state_dict(self, state: dict) -> None:
        if "stream" not in state:
            raise DataError("cannot resume a streaming dataset from the position of a bin/meta sampler; the "
                            "checkpoint was saved with other training data")
        if state["pack_len"] != self.packs.pack_len:
            raise DataError(f"cannot resume the stream: packs had {state['pack_len']} tokens in the checkpoint and "
                            f"have {self.packs.pack_len} now (micro_bsz * seq_len); resuming exactly needs the same")
        self.cursor = StreamCursor(**state["stream"])
        self.batch_count = state["batch_count"]


def build_train_loader(data: DataSettings, dp_rank: int, dp_size: int, num_workers: int = 0):
    """-> (loader, sampler, dataset_types): the loader yields step batches; the sampler holds the resumable data
    position (state_dict / load_state_dict; a StreamingTrainLoader is both)."""
    dataset, dataset_types = build_train_dataset(data)
    if isinstance(dataset, StreamingPacks):
        if data.rampup is not None:
            raise DataError("data.rampup_batch_size does not apply to a streaming data.train_dataset; remove it")
        loader = StreamingTrainLoader(dataset, data.micro_num, dp_rank, dp_size)
        return loader, loader, dataset_types
    sampler = StaticBatchSampler(len(dataset), data.micro_num, data.rampup, dp_rank, dp_size)
    return TrainLoader(dataset, sampler, num_workers), sampler, dataset_types


def discover_valid_sets(valid_folder) -> dict[str, list[Path]]:
    """{folder basename: its .bin files} for every folder under valid_folder that directly holds .bin files."""
    sets = {}
    for path in _bin_files(Path(valid_folder)):
        name = path.parent.name
        if name in sets and sets[name][0].parent != path.parent:
            raise DataError(f"two validation folders are named {name!r} ({sets[name][0].parent} and {path.parent}); "
                            "rename one")
        sets.setdefault(name, []).append(path)
    if not sets:
        raise DataError(f"no .bin files under valid_folder {valid_folder}")
    return sets


def build_valid_loaders(data: DataSettings, dp_rank: int, dp_size: int, num_workers: int = 0) -> dict[str, DataLoader]:
    """{name: DataLoader} of unpacked, padded validation batches ([batch, seq_len], see evods.data.collate).

    Batch size: min(valid_micro_num * micro_bsz, len // dp_size), rounded down to a multiple of micro_bsz; a set too
    small for one batch is left out. Each rank reads a disjoint, fixed slice; the last partial batch is dropped.
    """
    seq_len, micro_bsz, valid_micro_num = data.seq_len, data.micro_bsz, data.valid_micro_num
    if data.valid_folder:
        datasets = {name: ConcatDataset([TokenizedDataset(path, 0, VALID_MIN_LENGTH) for path in paths])
                    for name, paths in discover_valid_sets(data.valid_folder).items()}
    else:
        datasets = {"val": RandomDataset(RANDOM_VALID_SAMPLES_PER_RANK * dp_size, seq_len)}
    loaders = {}
    for name, dataset in datasets.items():
        batch_size = min(valid_micro_num * micro_bsz, len(dataset) // dp_size) // micro_bsz * micro_bsz
        if batch_size == 0:
            continue
        rank_indices = np.arange(dp_rank, len(dataset) // dp_size * dp_size, dp_size).tolist()
        loaders[name] = DataLoader(dataset, batch_size=batch_size, sampler=rank_indices, drop_last=True,
                                   num_workers=num_workers, collate_fn=partial(collate_documents, seq_len=seq_len),
                                   worker_init_fn=ignore_stop_signals)
    return loaders
