"""Loading, packing, sampling, resume and batches, on real tokenized data (samples/) and on the random dataset."""
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evods.data import (
    BatchSkipper,
    DataError,
    PackedDataset,
    RandomDataset,
    StaticBatchSampler,
    TokenizedDataset,
    batch_stats,
    build_train_loader,
    build_valid_loaders,
    discover_train_files,
    parse_skip_batches,
)
from evods.data.alpaca import tokenize_alpaca
from evods.data.tokenize import tokenize_file
from testkit.paths import DATA, REPO, TOKENIZER
from testkit.train_configs import data_config

SEQ_LEN, MICRO_BSZ, MICRO_NUM = 256, 2, 2


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """en: wiki (long documents) + Alpaca (masked prompts); cn: 200 song ci."""
    root = tmp_path_factory.mktemp("train")
    tokenize_file(DATA / "pretrain_en" / "wiki_demo.txt", root / "en" / "wiki.bin", TOKENIZER, progress=False)
    sft = tmp_path_factory.mktemp("sft")
    tokenize_alpaca(DATA / "alpaca" / "alpaca_en_demo.json", sft, TOKENIZER, split_ratio=0.1)
    (sft / "train" / "en" / "dataset.bin").rename(root / "en" / "alpaca.bin")
    (sft / "train" / "en" / "dataset.bin.meta").rename(root / "en" / "alpaca.bin.meta")
    tokenize_file(DATA / "pretrain_cn" / "ci.song.0.json", root / "cn" / "sub" / "ci.bin", TOKENIZER,
                  whole_record=True, progress=False)
    return root


def cfg(folder, **extra):
    return data_config(seq_len=SEQ_LEN, micro_num=MICRO_NUM, micro_bsz=MICRO_BSZ, train_folder=str(folder), **extra)


def test_type_ids_follow_sorted_top_level_folders(train_folder):
    types, files = discover_train_files(train_folder)
    assert types == ["cn", "en"]
    assert [(p.relative_to(train_folder).as_posix(), t) for p, t in files] == [
        ("cn/sub/ci.bin", 0), ("en/alpaca.bin", 1), ("en/wiki.bin", 1)]


def _check_packs(source: TokenizedDataset, packed: PackedDataset, seq_len, pack_into_one):
    P = packed.pack_len
    docs = [source[int(i)] for i in packed.order]
    stream = np.concatenate(docs)
    doc_id = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    packs = [packed[i] for i in range(len(packed))]
    assert len(packs) == len(stream) // P  # tail dropped
    ids = np.concatenate([p["input_ids"] for p in packs])
    labels = np.concatenate([p["labels"] for p in packs])
    positions = np.concatenate([p["position_ids"] for p in packs])
    n = len(ids)
    # every token of the shuffled stream, in order, exactly once
    assert np.array_equal(ids, np.abs(stream[:n]))
    # labels: the next token of the same document when it is a positive id, else -100 (no boundary crossing); with
    # pack_sample_into_one=True also -100 at each pack's last column, as InternEvo's PackedDatasetWithoutCuSeqlen
    nxt = stream[1:n + 1]
    same_doc = doc_id[1:n + 1] == doc_id[:n]
    if pack_into_one:
        same_doc[P - 1::P] = False
    assert np.array_equal(labels, np.where(same_doc & (nxt > 0), nxt, -100))
    assert np.all(labels[stream[1:n + 1] < 0] == -100)  # masked prompt tokens are never targets
    if pack_into_one:
        assert np.array_equal(positions, np.tile(np.arange(seq_len), n // seq_len))
        return
    starts = np.ones(n, dtype=bool)
    starts[1:] = doc_id[1:n] != doc_id[:n - 1]
    starts[::P] = True  # each pack starts fresh
    assert np.all(positions[starts] == 0)
    expected = np.zeros(n, dtype=np.int64)
    for i in range(1, n):  # reference: count up, restart at fragment starts and every seq_len
        expected[i] = 0 if starts[i] else (expected[i - 1] + 1) % seq_len
    assert np.array_equal(positions, expected)


@pytest.mark.parametrize("pack_into_one", [False, True])
@pytest.mark.parametrize("name", ["en/wiki.bin", "en/alpaca.bin", "cn/sub/ci.bin"])
def test_packing_invariants_on_real_data(train_folder, name, pack_into_one):
    source = TokenizedDataset(train_folder / name, type_id=3)
    packed = PackedDataset(source, SEQ_LEN, MICRO_BSZ, pack_into_one)
    _check_packs(source, packed, SEQ_LEN, pack_into_one)
    assert np.all(packed[0]["type_ids"] == 3)
    if name == "en/alpaca.bin":
        assert (np.concatenate([packed[i]["labels"] for i in range(len(packed))]) == -100).mean() > 0.1


def test_shuffle_is_internevo_seed_1024(train_folder):
    source = TokenizedDataset(train_folder / "en" / "wiki.bin")
    order = np.arange(len(source))
    np.random.RandomState(1024).shuffle(order)
    packed = PackedDataset(source, SEQ_LEN, MICRO_BSZ)
    assert np.array_equal(packed[0]["input_ids"][:10], source[int(order[0])][:10])


def test_min_length_filters(train_folder):
    source = TokenizedDataset(train_folder / "cn" / "sub" / "ci.bin", min_length=300)
    full = TokenizedDataset(train_folder / "cn" / "sub" / "ci.bin")
    assert len(source) == int((full.lengths >= 300).sum()) and 0 < len(source) < len(full)
    assert source.num_filtered == len(full) - len(source)
    assert all(len(source[i]) >= 300 for i in range(0, len(source), 50))
    data_cfg = cfg(train_folder, min_length=0, min_length_dict={"cn/": 300})
    _, sampler, _ = build_train_loader(data_cfg, 0, 1)
    _, unfiltered, _ = build_train_loader(cfg(train_folder), 0, 1)
    assert sampler.num_samples < unfiltered.num_samples
    with pytest.raises(DataError, match="matches several min_length_dict keys"):
        build_train_loader(cfg(train_folder, min_length_dict={"cn": 1, "sub": 2}), 0, 1)


def test_random_dataset_is_internevo_dummy_data():
    data = RandomDataset(1000, max_len=100)
    rng = np.random.RandomState(1999)
    ns, rs = rng.randint(1, 30, size=1000), rng.randint(10, 200, size=1000)
    for i in (0, 1, 999):
        expected = ([ns[i], rs[i]] + list(range(ns[i])) * rs[i])[:100]
        assert data[i].tolist() == expected and data.lengths[i] == len(expected)
    loader, _, types = build_train_loader(data_config(seq_len=64, micro_num=3, micro_bsz=2), 0, 1)
    batch = next(iter(loader))
    assert types == ["en", "cn", "code"]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, 128) for k in batch}


def test_batches_are_fixed_shape_long_tensors_with_stats(train_folder):
    loader, _, types = build_train_loader(cfg(train_folder), 0, 1)
    batch = next(iter(loader))
    assert sorted(batch) == ["input_ids", "labels", "position_ids", "type_ids"]
    for tensor in batch.values():
        assert tensor.dtype == torch.long and tuple(tensor.shape) == (MICRO_NUM, SEQ_LEN * MICRO_BSZ)
    assert set(batch["type_ids"].unique().tolist()) <= {0, 1}
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert batch_stats(positions) == {"num_samples_in_batch": 5, "largest_length": 6, "largest_batch": 3,
                                      "smallest_batch": 2}


def _take(loader, count):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(loader, count)]


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


RESUME_SCRIPT = """
import sys, torch
from evods.data import build_train_loader
data_cfg, rank, size, state_path, out_path, count = torch.load(sys.argv[1], weights_only=False)
loader, sampler, _ = build_train_loader(data_cfg, rank, size)
sampler.load_state_dict(torch.load(state_path, weights_only=False))
it = iter(loader)
torch.save([next(it) for _ in range(count)], out_path)
"""


@pytest.mark.parametrize("rampup", ["", "1 1 2"])
def test_resume_in_a_fresh_process_continues_exactly(train_folder, tmp_path, rampup):
    data_cfg = cfg(train_folder, rampup_batch_size=rampup)
    reference, sampler, _ = build_train_loader(data_cfg, 1, 2)
    k = sampler._rank_indices.size // MICRO_NUM + 3  # steps of a full pass and then some
    expected = _take(reference, k + 3)[k:]
    loader, sampler, _ = build_train_loader(data_cfg, 1, 2, num_workers=1)  # prefetching must not move the state
    consumed = _take(loader, k)
    assert sampler.epoch == 1 and sampler.batch_count == k  # the resume point lies in the second pass
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    torch.save((data_cfg, 1, 2, tmp_path / "state.pt", tmp_path / "out.pt", 3), tmp_path / "args.pt")
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "args.pt")], check=True, timeout=120,
                   cwd=REPO)
    resumed = torch.load(tmp_path / "out.pt", weights_only=False)
    assert _same(resumed, expected) and not _same(consumed[-3:], expected)
    if rampup:
        assert [b["input_ids"].shape[0] for b in consumed[:5]] == [1, 1, 2, 2, 2]


def test_dp_ranks_are_disjoint_and_cover_each_pass():
    num_samples, micro_num = 103, 4
    samplers = [StaticBatchSampler(num_samples, micro_num, dp_rank=r, dp_size=2) for r in range(2)]
    steps = 103 // (micro_num * 2)
    seen = [list(itertools.chain.from_iterable(itertools.islice(iter(s), steps))) for s in samplers]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == steps * micro_num * 2 == len(set(seen[0]) | set(seen[1]))
    order = np.arange(num_samples)
    np.random.RandomState(1024).shuffle(order)
    assert sorted(seen[0] + seen[1]) == sorted(order[:steps * micro_num * 2].tolist())
    with pytest.raises(DataError, match="was 2 in the checkpoint"):
        StaticBatchSampler(num_samples, micro_num, dp_size=1).load_state_dict(samplers[0].state_dict())


def test_batch_skipper():
    skip = BatchSkipper(parse_skip_batches("100-200, 350,150-160"))
    assert [skip(n) for n in (99, 100, 155, 200, 201, 349, 350, 351)] == [0, 1, 1, 1, 0, 0, 1, 0]
    assert not BatchSkipper(parse_skip_batches(""))(0)
    with pytest.raises(DataError, match="skip_batches"):
        parse_skip_batches("5-x")
    with pytest.raises(DataError, match="skip_batches"):
        parse_skip_batches("9-3")


def test_valid_loaders_are_padded_documents(train_folder, tmp_path):
    valid = tmp_path / "valid"
    tokenize_alpaca(DATA / "alpaca" / "alpaca_zh_demo.json", tmp_path / "zh", TOKENIZER, split_ratio=0.5)
    valid.mkdir()
    (tmp_path / "zh" / "valid" / "en").rename(valid / "zh")
    loaders = build_valid_loaders(cfg(train_folder, valid_folder=str(valid), valid_micro_num=2), 0, 2)
    batch = next(iter(loaders["zh"]))
    dataset = TokenizedDataset(valid / "zh" / "dataset.bin", min_length=50)  # InternEvo keeps its default of 50
    assert len(dataset) < 500
    first = dataset[0][:SEQ_LEN]
    assert batch["input_ids"].shape == (4, SEQ_LEN)
    assert batch["input_ids"][0, :len(first)].tolist() == np.abs(first).tolist()
    assert batch["input_ids"][0, len(first):].eq(0).all() and batch["labels"][0, len(first) - 1:].eq(-100).all()
    expected = np.where(first[1:] > 0, first[1:], -100)
    assert batch["labels"][0, :len(first) - 1].tolist() == expected.tolist()
    assert len(loaders["zh"]) == (len(dataset) // 2) // 4
    assert "val" in build_valid_loaders(data_config(seq_len=32, micro_num=2, micro_bsz=2), 0, 1)


# ---- bad files

def _copy_pair(src: Path, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    Path(f"{dst}.meta").write_bytes(Path(f"{src}.meta").read_bytes())
    return dst


def test_bin_without_meta_is_refused(train_folder, tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "lonely.bin").write_bytes((train_folder / "en" / "wiki.bin").read_bytes())
    with pytest.raises(DataError, match=r"lonely\.bin has no meta file"):
        build_train_loader(cfg(tmp_path), 0, 1)


def test_loose_bin_in_train_folder_is_refused(train_folder, tmp_path):
    _copy_pair(train_folder / "en" / "wiki.bin", tmp_path / "wiki.bin")
    with pytest.raises(DataError, match="directly in train_folder"):
        discover_train_files(tmp_path)


def test_meta_that_does_not_reach_the_file_end_is_refused(train_folder, tmp_path):
    bin_path = _copy_pair(train_folder / "cn" / "sub" / "ci.bin", tmp_path / "ci.bin")
    with open(bin_path, "ab") as handle:
        handle.write(b'{"tokens": [1, 2]}\n')
    with pytest.raises(DataError, match=r"ci\.bin row 199 .*does not end at the end of the file"):
        TokenizedDataset(bin_path)


def test_token_count_mismatch_names_the_row(train_folder, tmp_path):
    bin_path = _copy_pair(train_folder / "cn" / "sub" / "ci.bin", tmp_path / "ci.bin")
    meta = np.load(f"{bin_path}.meta")
    meta[5, 1] += 1
    np.save(tmp_path / "m.npy", meta)
    (tmp_path / "m.npy").rename(f"{bin_path}.meta")
    dataset = TokenizedDataset(bin_path)
    with pytest.raises(DataError, match=r"ci\.bin row 5 .*meta says \d+ tokens, the line has"):
        dataset[5]


def test_meta_of_the_wrong_shape_or_a_garbled_line_is_refused(train_folder, tmp_path):
    bin_path = _copy_pair(train_folder / "cn" / "sub" / "ci.bin", tmp_path / "ci.bin")
    good_meta = Path(f"{bin_path}.meta").read_bytes()
    np.save(tmp_path / "m.npy", np.zeros((3, 3), dtype=np.int32))
    (tmp_path / "m.npy").rename(f"{bin_path}.meta")
    with pytest.raises(DataError, match=r"must hold an integer \(N, 2\) array"):
        TokenizedDataset(bin_path)
    Path(f"{bin_path}.meta").write_bytes(good_meta)
    data = bytearray(bin_path.read_bytes())
    offset = int(np.load(f"{bin_path}.meta")[7, 0])
    data[offset + 2] = ord("X")
    bin_path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"ci\.bin row 7 \(byte \d+\): not a"):
        TokenizedDataset(bin_path)[7]
