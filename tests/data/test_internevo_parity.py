"""The sampler's index stream (ramp-up included) and pack_sample_into_one=True labels equal InternEvo's, checked
against the references in testkit/internevo_rules.py."""
import itertools

import numpy as np
import pytest

from evods.data import (
    DataError,
    PackedDataset,
    StaticBatchSampler,
    TokenizedDataset,
    discover_train_files,
    parse_rampup,
)
from evods.data.binfile import BinWriter
from evods.data.tokenize import tokenize_file
from testkit.internevo_rules import TooMuchRampup, internevo_batches, internevo_pack_into_one
from testkit.paths import DATA, TOKENIZER


@pytest.mark.parametrize("num_samples, micro_num, dp_size, rampup", [
    (1000, 4, 1, ""),
    (1000, 4, 2, "1 1 2"),  # ramp-up to micro_num, then full batches
    (103, 4, 2, "1 1 2"),  # a pass ends inside the ramp-up's reserve: short batches, new pass still ramping
    (37, 3, 1, "1 1 4"),
    (40, 8, 2, "2 2 1"),
    (61, 4, 4, "1 2 1"),  # the increment overshoots micro_num: the last ramp-up size is capped
    (29, 3, 2, "3 1 2"),  # start at micro_num: no ramp-up
    (13, 2, 1, "1 1 1"),
    (7, 4, 1, ""),  # a pass of fewer packs than micro_num * dp_size: refused
    (20, 4, 2, "1 1 4"),  # the ramp-up reads 48 packs: "Too much rampup samples"
])
def test_sampler_index_stream_is_internevos(num_samples, micro_num, dp_size, rampup):
    count = 3 * num_samples // dp_size + 4  # three passes and more
    schedule = parse_rampup(rampup, micro_num)
    for rank in range(dp_size):
        try:
            expected = internevo_batches(num_samples, micro_num, rampup, rank, dp_size, count)
        except (TooMuchRampup, ValueError) as refused:
            message = "Too much rampup samples" if isinstance(refused, TooMuchRampup) else "too few for one batch"
            with pytest.raises(DataError, match=message):
                list(itertools.islice(StaticBatchSampler(num_samples, micro_num, schedule, rank, dp_size), count))
            continue
        sampler = StaticBatchSampler(num_samples, micro_num, schedule, rank, dp_size)
        assert list(itertools.islice(sampler, count)) == expected
        for _ in range(count):  # the consumed-steps path (advance) walks the same stream
            sampler.advance()
        assert sampler.batch_count == count


def test_resume_anywhere_continues_internevos_stream():
    """A pass shuffled during the ramp-up keeps the ramp-up's share also when resumed after the ramp-up ended."""
    num_samples, micro_num, rampup = 103, 4, "1 1 3"  # the first pass keeps 100 packs, later ones 96
    expected = internevo_batches(num_samples, micro_num, rampup, 1, 2, 80)
    for consumed in (1, 5, 12, 16, 17, 30, 60):  # inside the ramp-up, after it in the first pass, later passes
        sampler = StaticBatchSampler(num_samples, micro_num, parse_rampup(rampup, micro_num), 1, 2)
        for _ in range(consumed):
            sampler.advance()
        resumed = StaticBatchSampler(num_samples, micro_num, parse_rampup(rampup, micro_num), 1, 2)
        resumed.load_state_dict(sampler.state_dict())
        assert list(itertools.islice(resumed, 5)) == expected[consumed:consumed + 5], consumed


def test_too_much_rampup_names_the_numbers():
    with pytest.raises(DataError, match=r"Too much rampup samples: rampup_batch_size '1 1 4' reads 48 packs over 2 "
                                        r"data-parallel ranks before reaching micro_num, but the training data has 20"):
        StaticBatchSampler(20, 4, parse_rampup("1 1 4", 4), 0, 2)
    with pytest.raises(DataError, match=r"need 0 < start <= micro_num \(4\), incr > 0, every > 0"):
        parse_rampup("1 0 4", 4)


def test_pack_sample_into_one_labels_end_each_pack_as_internevo():
    rng = np.random.RandomState(7)
    docs = [rng.randint(-40, 300, size=rng.randint(1, 50)).tolist() for _ in range(40)]  # negatives: masked tokens

    class Source:
        lengths = np.array([len(doc) for doc in docs])
        type_id = 0

        def __len__(self):
            return len(docs)

        def __getitem__(self, index):
            return np.array(docs[index], dtype=np.int64)

    for seq_len, micro_bsz in [(8, 2), (16, 1), (5, 3)]:
        packed = PackedDataset(Source(), seq_len, micro_bsz, pack_sample_into_one=True)
        expected = internevo_pack_into_one(docs, seq_len, micro_bsz)
        assert len(packed) == len(expected)
        for pack, reference in zip(packed, expected):
            assert pack["input_ids"].tolist() == reference["input_ids"]
            assert pack["labels"].tolist() == reference["labels"]
            assert pack["labels"][-1] == -100


def test_pack_end_labels_on_real_text(tmp_path):
    """A long document runs on from pack to pack: -100 at every pack's end with True, the next token with False."""
    path = tmp_path / "wiki.bin"
    tokenize_file(DATA / "pretrain_en" / "wiki_demo.txt", path, TOKENIZER, progress=False)
    source = TokenizedDataset(path)
    docs = [source[i].tolist() for i in range(len(source))]
    into_one = PackedDataset(source, 128, 2, pack_sample_into_one=True)
    expected = internevo_pack_into_one(docs, 128, 2)
    assert [p["labels"].tolist() for p in into_one] == [p["labels"] for p in expected]
    cut = PackedDataset(source, 128, 2, pack_sample_into_one=False)
    continues = [i for i in range(len(cut) - 1) if cut[i]["labels"][-1] != -100]
    assert continues, "some document must go on into the next pack"
    for i in continues:
        assert cut[i]["labels"][-1] == cut[i + 1]["input_ids"][0] and into_one[i]["labels"][-1] == -100


def test_file_order_and_type_ids_differ_from_internevo_on_purpose(tmp_path):
    """Sub-folders are read sorted whatever order the file system lists them in; only folders get type ids."""
    for name in ("en/z_late", "en/a_early", "cn", "en"):  # created out of order
        writer = BinWriter(tmp_path / name / "part.bin", "create")
        writer.write([[5, 6, 7]])
        writer.commit()
    (tmp_path / "README.txt").write_text("notes")  # InternEvo would give it a type id
    types, files = discover_train_files(tmp_path)
    assert types == ["cn", "en"]
    assert [(path.relative_to(tmp_path).as_posix(), type_id) for path, type_id in files] == [
        ("cn/part.bin", 0), ("en/part.bin", 1), ("en/a_early/part.bin", 1), ("en/z_late/part.bin", 1)]
