"""evods' data as a library (issue: accelerate-style scripts, the Trainer and `datasets`): transformers batches,
PackedLoader in train_ds.py's order, Hugging Face datasets (map-style and streaming) packed as bin/meta files are,
tools/tokenizer.py on HF datasets, and the one-line errors a script author meets."""
import itertools
import sys

import datasets
import numpy as np
import pytest
import torch

from evods.checkpoint.resume.reshard import reshard_sampler_state
from evods.cli.tokenizer import main as tokenizer_command
from evods.config import ConfigError
from evods.data import (
    DataError,
    PackedDataset,
    PackedLoader,
    TokenizedDataset,
    build_train_loader,
    check_tokenizer_fits,
    collate_hf,
    collate_packs,
    hf_batch,
    open_hf_dataset,
    packed_dataset,
)
from evods.data.hf_source import StreamCursor, StreamingPacks, TextEncoder
from evods.data.loader import StreamingTrainLoader
from evods.data.tokenize import tokenize_file
from evods.training.distributed import LaunchError
from evods.training.hf_accelerate import check_zero_stage, deepspeed_accelerator, derive_batch_keys
from testkit.paths import DATA, TOKENIZER
from testkit.train_configs import data_config, tiny_config

C4 = DATA / "pretrain_en" / "c4_demo.jsonl"
SEQ_LEN, MICRO_BSZ, MICRO_NUM = 64, 2, 2
V7_VOCAB = 103168


@pytest.fixture(scope="module")
def c4_bin(tmp_path_factory):
    """The bin/meta route: tools/tokenizer.py's output for c4_demo.jsonl, as data/train/en/c4.bin."""
    root = tmp_path_factory.mktemp("train")
    tokenize_file(C4, root / "en" / "c4.bin", TOKENIZER, progress=False)
    return root


@pytest.fixture(scope="module")
def c4_dataset():
    return datasets.load_dataset("json", data_files=str(C4), split="train")


def same_packs(a, b):
    return all(np.array_equal(a[name], b[name]) for name in ("input_ids", "position_ids", "labels", "type_ids"))


def token_mean_loss(logits, shifted_labels):
    """train_ds.py's loss of one micro-batch: the mean cross entropy over its targets (labels already shifted)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted_labels.flatten(), ignore_index=-100)


def test_hf_batches_are_what_transformers_models_train_on(c4_dataset):
    from transformers import LlamaForCausalLM

    from evods.checkpoint.formats.hf import llama_config
    from evods.model import InternLMConfig, InternLMForCausalLM

    packs = packed_dataset(c4_dataset, SEQ_LEN, MICRO_BSZ)
    rows = [packs[i] for i in range(3)]
    ours, batch = collate_packs(rows), collate_hf(rows)
    assert sorted(batch) == ["input_ids", "labels", "position_ids", "shift_labels"]
    labels = batch["labels"]
    assert torch.equal(labels[:, 1:], ours["labels"][:, :-1]) and (labels[:, 0] == -100).all()  # unshifted
    for row in range(3):  # no document's first token is a target (the packer's document starts)
        starts = packs.cum - row * packs.pack_len
        assert (labels[row, starts[(starts >= 0) & (starts < packs.pack_len)]] == -100).all()
    assert torch.equal(labels[:, 1:] == -100, (ours["labels"] == -100)[:, :-1])
    assert ((batch["position_ids"] == 0).sum(1) > 1).all()  # several documents per row, each from position 0
    cut = ours["labels"][:, -1] != -100
    assert cut.any()  # a document continues into the next pack: only shift_labels can hold that last target

    torch.manual_seed(0)
    config = InternLMConfig(vocab_size=V7_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4)
    model = InternLMForCausalLM(config)
    llama = LlamaForCausalLM(llama_config(config))
    llama.load_state_dict(model.state_dict())
    out = model(**batch)
    assert torch.allclose(out.loss, token_mean_loss(out.logits, ours["labels"]), rtol=1e-6)
    # transformers' Llama reads the documents from position_ids too, once it builds no KV cache in training
    llama_out = llama(**batch, use_cache=False)
    assert torch.allclose(llama_out.logits, out.logits, atol=1e-5) and torch.allclose(llama_out.loss, out.loss)
    # labels alone: the model shifts them; only the targets past each row's end are lost
    without_shift = model(**{k: v for k, v in batch.items() if k != "shift_labels"}).loss
    kept = ours["labels"].clone()
    kept[:, -1] = -100
    assert torch.allclose(without_shift, token_mean_loss(out.logits, kept), rtol=1e-6)


def step_rows(loader, steps):
    """The micro-batches (one row each) of train_ds.py's loader for `steps` steps, as transformers batches."""
    rows = []
    for batch in map(hf_batch, itertools.islice(iter(loader), steps)):
        rows += [{name: tensor[i:i + 1] for name, tensor in batch.items()} for i in range(MICRO_NUM)]
    return rows


def same_batches(a, b):
    return len(a) == len(b) and all(sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("streaming", [False, True])
def test_packed_loader_is_train_ds_order_and_resumes_inside_a_step(c4_bin, tmp_path, streaming):
    if streaming:
        data_cfg = data_config(seq_len=SEQ_LEN, micro_bsz=MICRO_BSZ, micro_num=MICRO_NUM,
                               train_dataset=dict(path=str(C4), streaming=True))
        dataset = packed_dataset(open_hf_dataset(C4, streaming=True), SEQ_LEN, MICRO_BSZ)
    else:
        data_cfg = data_config(seq_len=SEQ_LEN, micro_bsz=MICRO_BSZ, micro_num=MICRO_NUM, train_folder=str(c4_bin))
        dataset = packed_dataset(c4_bin, SEQ_LEN, MICRO_BSZ)
    steps = 4
    for rank in range(2):
        expected = step_rows(build_train_loader(data_cfg, rank, 2)[0], steps)
        loader = PackedLoader(dataset, MICRO_NUM, rank=rank, world=2)
        assert same_batches(list(itertools.islice(iter(loader), steps * MICRO_NUM)), expected)
    for consumed in (3, 4):  # inside a step, and at a step's end
        loader = PackedLoader(dataset, MICRO_NUM, rank=1, world=2)
        list(itertools.islice(iter(loader), consumed))
        torch.save(loader.state_dict(), tmp_path / "state.pt")
        resumed = PackedLoader(dataset, MICRO_NUM, rank=1, world=2)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        assert same_batches(list(itertools.islice(iter(resumed), 3)), expected[consumed:consumed + 3])


def test_hf_dataset_packs_equal_the_bin_meta_route(c4_bin, c4_dataset):
    from_bin = PackedDataset(TokenizedDataset(c4_bin / "en" / "c4.bin"), SEQ_LEN, MICRO_BSZ)
    from_hf = packed_dataset(c4_dataset, SEQ_LEN, MICRO_BSZ)  # tokenized on the fly, same shuffle (seed 1024)
    assert len(from_hf) == len(from_bin) > 100
    assert all(same_packs(from_hf[i], from_bin[i]) for i in range(len(from_bin)))


def test_streaming_packs_equal_the_bin_meta_route_and_resume_exactly(c4_bin, c4_dataset, tmp_path):
    from_bin = PackedDataset(TokenizedDataset(c4_bin / "en" / "c4.bin"), SEQ_LEN, MICRO_BSZ)
    # the same text streamed from a jsonl file in the order the bin route's shuffle reads it
    c4_dataset.select(from_bin.order.tolist()).to_json(tmp_path / "shuffled.jsonl")
    stream = open_hf_dataset(tmp_path / "shuffled.jsonl", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    packs = packed_dataset(stream, SEQ_LEN, MICRO_BSZ)
    one_pass = list(packs)
    assert len(one_pass) == len(from_bin) and all(same_packs(a, from_bin[i]) for i, a in enumerate(one_pass))

    steps_per_pass = len(from_bin) // (MICRO_NUM * 2)
    reference = StreamingTrainLoader(packs, MICRO_NUM, dp_rank=1, dp_size=2)
    expected = list(itertools.islice(iter(reference), steps_per_pass + 3))
    for consumed in (5, steps_per_pass + 1):  # mid-pass, and in the second pass
        loader = StreamingTrainLoader(packs, MICRO_NUM, dp_rank=1, dp_size=2)
        list(itertools.islice(iter(loader), consumed))
        torch.save(loader.state_dict(), tmp_path / "state.pt")
        resumed = StreamingTrainLoader(packs, MICRO_NUM, dp_rank=1, dp_size=2)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        assert resumed.cursor.rows > 0  # resuming skips the rows already consumed, it does not replay them
        assert same_batches([next(iter(resumed))], [expected[consumed]])
    assert StreamCursor(**reference.state_dict()["stream"]).epoch == 1
    # a checkpoint of 2 data ranks resumed by 1 (evods.checkpoint.resume.reshard): the stream goes on where both stood
    loader = StreamingTrainLoader(packs, MICRO_NUM, dp_rank=1, dp_size=2)
    list(itertools.islice(iter(loader), 5))
    alone = StreamingTrainLoader(packs, MICRO_NUM, dp_rank=0, dp_size=1)
    alone.load_state_dict(reshard_sampler_state(loader.state_dict(), 1, "a 2-rank checkpoint"))
    first = 5 * MICRO_NUM * 2
    assert same_batches([next(iter(alone))], [collate_packs(one_pass[first:first + MICRO_NUM])])


def test_train_dataset_config_key_and_its_errors(c4_bin):
    sizes = dict(seq_len=SEQ_LEN, micro_bsz=MICRO_BSZ, micro_num=MICRO_NUM)
    spec = dict(path=str(C4), streaming=True)
    cfg = tiny_config(data=dict(**sizes, train_dataset=spec))
    assert cfg.data.train_dataset.text_key == "text" and cfg.data.train_dataset.tokenizer_path is None
    loader, sampler, types = build_train_loader(cfg.data, 0, 1)
    assert types == ["c4_demo"] and sampler is loader
    assert next(iter(loader))["input_ids"].shape == (MICRO_NUM, SEQ_LEN * MICRO_BSZ)
    # not streaming: train_ds.py's batches are those of the same text as a .bin file
    cfg = tiny_config(data=dict(**sizes, train_dataset=dict(path=str(C4))))
    from_hf, _, _ = build_train_loader(cfg.data, 1, 2)
    from_bin, _, _ = build_train_loader(data_config(**sizes, train_folder=str(c4_bin)), 1, 2)
    assert same_batches(list(itertools.islice(iter(from_hf), 3)), list(itertools.islice(iter(from_bin), 3)))
    with pytest.raises(ConfigError, match="train_folder and data.train_dataset are both set"):
        tiny_config(data=dict(train_folder="data/train", train_dataset=spec))
    with pytest.raises(ConfigError, match="data.train_dataset.path is required"):
        tiny_config(data=dict(train_dataset=dict(streaming=True)))
    with pytest.raises(ConfigError, match=r"streaming.*train_dataset=dict"):
        tiny_config(data=dict(type="streaming"))


def test_script_author_errors_are_one_clear_line(c4_dataset, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no column 'content' \(its columns: text\)"):
        packed_dataset(c4_dataset, SEQ_LEN, MICRO_BSZ, text_key="content")
    with pytest.raises(DataError, match="no column 'content'"):
        StreamingPacks(c4_dataset.to_iterable_dataset(), TextEncoder(text_key="content"), SEQ_LEN, MICRO_BSZ)
    with pytest.raises(DataError, match="holds int values, not text"):
        packed_dataset(datasets.Dataset.from_dict({"text": [1, 2]}), SEQ_LEN, MICRO_BSZ)
    with pytest.raises(DataError, match=r"has 103168 ids but the model has vocab_size=32000; use the model's"):
        check_tokenizer_fits(None, 32000)
    check_tokenizer_fits(None, V7_VOCAB)
    with pytest.raises(ConfigError, match=r"ZeRO stage 3.*parallel.tensor=2.*set zero_stage: 1"):
        check_zero_stage(3, tensor_parallel=2)
    check_zero_stage(1, tensor_parallel=2)  # ZeRO-1 under tensor parallelism: tests/training/test_hf_examples.py
    check_zero_stage(3, tensor_parallel=1)
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    derive_batch_keys(ds_config, micro_num=4, clip_grad_norm=1.0, data_parallel=2)
    assert ds_config == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                         "train_batch_size": 8, "gradient_clipping": 1.0}
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 .* conflicts .*micro_num gives 4"):
        derive_batch_keys({"gradient_accumulation_steps": 8}, micro_num=4, clip_grad_norm=1.0, data_parallel=2)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(LaunchError, match="accelerate launch --config_file examples/accelerate_zero1.yaml"):
        deepspeed_accelerator(micro_num=2, clip_grad_norm=1.0)
    # what `accelerate launch` exports for a ZeRO-2 config, with a tensor-parallel model
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match=r"^the accelerate config asks for ZeRO stage 2, but the model is split"):
        deepspeed_accelerator(micro_num=2, clip_grad_norm=1.0, tensor_parallel=2)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 in the accelerate config conflicts"):
        deepspeed_accelerator(micro_num=2, clip_grad_norm=1.0)


def test_tokenizer_tool_reads_local_hf_datasets_as_it_reads_jsonl(c4_bin, c4_dataset, tmp_path, monkeypatch,
                                                                   capsys):
    c4_dataset.to_parquet(tmp_path / "c4.parquet")
    c4_dataset.save_to_disk(tmp_path / "saved")
    c4_dataset.rename_column("text", "content").to_json(tmp_path / "files" / "part-0.jsonl")
    expected = (c4_bin / "en" / "c4.bin").read_bytes()
    for source, text_key, workers in ((tmp_path / "c4.parquet", "text", 2), (tmp_path / "saved", "text", 1),
                                      (tmp_path / "files", "content", 1)):
        out = tmp_path / "out" / f"{source.name}.bin"
        stats = tokenize_file(source, out, TOKENIZER, text_key=text_key, workers=workers, progress=False)
        assert out.read_bytes() == expected and stats.samples == 50
    monkeypatch.setattr(sys, "argv", ["tokenizer.py"])  # the command's name in its messages, as from a clone
    status = tokenizer_command(["--quiet", "--text_input_path", str(tmp_path / "files"), "--bin_output_path",
                                str(tmp_path / "x.bin")])
    assert status == 1 and not (tmp_path / "x.bin").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tokenizer.py: {tmp_path / 'files'} has no column 'text' (its columns: content); choose the text column "
        "with text_key (--text_key)")
