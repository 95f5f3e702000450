"""tools/tokenizer.py and tools/alpaca_tokenizer.py: formats, byte-exact output, parallel encoding, bad input."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from evods.data.alpaca import tokenize_alpaca
from evods.data.binfile import TokenizedDataset
from evods.data.errors import DataError
from evods.data.tokenize import tokenize_file
from testkit.paths import REPO

QUICKSTART_LINES = [
    "感恩生活中的每一个细节，才能真正体会到幸福的滋味。",
    "梦想是人生的动力源泉，努力追逐，才能实现自己的目标。",
    "学会宽容和理解，才能建立真正和谐的人际关系。",
]
QUICKSTART_BIN = (
    '{"tokens": [73075, 75302, 69522, 69022, 98899, 67713, 68015, 81269, 74637, 75445, 99157]}\n'
    '{"tokens": [69469, 60355, 73026, 68524, 60846, 61844, 98899, 67775, 79241, 98899, 67713, 67800, 67453, 67838, '
    '99157]}\n'
    '{"tokens": [68057, 79017, 60378, 68014, 98899, 67713, 67990, 68015, 70381, 67428, 61003, 67622, 99157]}\n'
)


def run_tool(script, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def tokenize_cli(*args):
    return run_tool("tokenizer.py", "--quiet", *args)


def outputs(bin_path):
    bin_path = Path(bin_path)
    return [p for p in (bin_path, Path(f"{bin_path}.meta")) if p.exists()]


def leftovers(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if ".tmp" in p.name)


@pytest.fixture
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


@pytest.fixture
def raw_data(tmp_path):
    path = tmp_path / "raw_data.txt"
    path.write_text("".join(line + "\n" for line in QUICKSTART_LINES), encoding="utf-8")
    return path


def test_quickstart_example_byte_for_byte(tmp_path, raw_data, tokenizer_path):
    out = tmp_path / "cn" / "output.bin"
    result = tokenize_cli("--text_input_path", raw_data, "--bin_output_path", out, "--tokenizer_path", tokenizer_path)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == QUICKSTART_BIN
    meta_bytes = Path(f"{out}.meta").read_bytes()
    expected = tmp_path / "expected.npy"
    np.save(expected, np.array([(0, 11), (90, 15), (208, 13)], dtype=np.int32))
    assert meta_bytes == expected.read_bytes()  # np.save layout, int32, exact name X.bin.meta
    assert not Path(f"{out}.meta.npy").exists()
    assert "3 samples, 39 tokens" in result.stderr


def test_bos_eos_give_internevo_later_layout(tmp_path, raw_data, tokenizer_path):
    out = tmp_path / "out.bin"
    tokenize_file(raw_data, out, tokenizer_path, add_bos=True, add_eos=True, progress=False)
    assert np.load(f"{out}.meta").tolist() == [[0, 13], [96, 17], [220, 15]]
    first = json.loads(out.read_text().splitlines()[0])["tokens"]
    assert first[0] == 1 and first[-1] == 2 and first[1:-1] == json.loads(QUICKSTART_BIN.splitlines()[0])["tokens"]


def _subset(src: Path, dst: Path, lines: int) -> Path:
    """The first `lines` lines of src (all of them if it has fewer)."""
    with open(src, encoding="utf-8") as handle:
        dst.write_text("".join(line for _, line in zip(range(lines), handle)), encoding="utf-8")
    return dst


@pytest.mark.parametrize("source, options, expected_text", [
    ("pretrain_en/wiki_demo.txt", {}, lambda line: line.strip()),
    ("pretrain_en/c4_demo.jsonl", {}, lambda line: json.loads(line)["text"]),
    ("pretrain_en/c4_demo.jsonl", {"whole_record": True}, lambda line: line),
    ("pretrain_cn/songci.txt", {}, lambda line: line.strip()),
])
def test_real_line_files_tokenize_identically_with_1_and_2_workers(tmp_path, data_dir, tokenizer_path, sp, source,
                                                                    options, expected_text, monkeypatch):
    monkeypatch.setattr("evods.data.tokenize.CHUNK_BYTES", 16384)  # many chunks, so both workers get some
    src = _subset(data_dir / source, tmp_path / Path(source).name, 30)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "out.bin"
        stats = tokenize_file(src, out, tokenizer_path, workers=workers, progress=False, **options)
        results[workers] = [p.read_bytes() for p in outputs(out)]
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        assert stats.samples == len(lines)
    assert results[1] == results[2]
    dataset = TokenizedDataset(tmp_path / "w1" / "out.bin")
    for i in (0, len(lines) // 2, len(lines) - 1):
        assert dataset[i].tolist() == sp.encode(expected_text(lines[i]))


def test_real_json_files_tokenize_whole_records_and_a_chosen_key(tmp_path, data_dir, tokenizer_path, sp, monkeypatch):
    src = data_dir / "pretrain_cn" / "ci.song.0.json"
    records = json.loads(src.read_text(encoding="utf-8"))
    whole = {}
    monkeypatch.setattr("evods.data.tokenize.CHUNK_BYTES", 16384)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "ci.bin"
        tokenize_file(src, out, tokenizer_path, whole_record=True, workers=workers, progress=False)
        whole[workers] = [p.read_bytes() for p in outputs(out)]
    assert whole[1] == whole[2]
    dataset = TokenizedDataset(tmp_path / "w1" / "ci.bin")
    assert len(dataset) == len(records)
    for i in (0, len(records) // 2, len(records) - 1):
        assert dataset[i].tolist() == sp.encode(json.dumps(records[i]))  # InternEvo: the serialized record
    out = tmp_path / "rhythmic.bin"
    tokenize_file(src, out, tokenizer_path, text_key="rhythmic", progress=False)
    assert TokenizedDataset(out)[3].tolist() == sp.encode(records[3]["rhythmic"])


def test_json_reader_handles_values_cut_by_the_read_buffer(tmp_path, tokenizer_path, sp, monkeypatch):
    monkeypatch.setattr("evods.data.tokenize.CHUNK_BYTES", 7)  # every record and number straddles reads
    records = [{"text": "你好 world", "n": 12345678}, {"text": "second\nline", "n": [1, 2.5]}, {"text": "x"}]
    src = tmp_path / "small.json"
    src.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    out = tmp_path / "out.bin"
    tokenize_file(src, out, tokenizer_path, whole_record=True, progress=False)
    assert [TokenizedDataset(out)[i].tolist() for i in range(3)] == [sp.encode(json.dumps(r)) for r in records]


def test_append_overwrite_and_refusal(tmp_path, raw_data, tokenizer_path):
    out = tmp_path / "out.bin"
    tokenize_file(raw_data, out, tokenizer_path, progress=False)
    with pytest.raises(DataError, match="already exists"):
        tokenize_file(raw_data, out, tokenizer_path, progress=False)
    tokenize_file(raw_data, out, tokenizer_path, mode="append", progress=False)
    assert out.read_text() == QUICKSTART_BIN * 2
    assert np.load(f"{out}.meta").tolist() == [[0, 11], [90, 15], [208, 13], [312, 11], [402, 15], [520, 13]]
    tokenize_file(raw_data, out, tokenizer_path, mode="overwrite", progress=False)
    assert out.read_text() == QUICKSTART_BIN
    assert leftovers(tmp_path) == []


def test_skip_bad_lines_counts_and_skips(tmp_path, tokenizer_path, sp):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": broken\n\n\xff\xfe{"text": "x"}\n{"other": 1}\n{"text": "two"}\n')
    out = tmp_path / "out.bin"
    stats = tokenize_file(src, out, tokenizer_path, skip_bad_lines=True, progress=False)
    assert (stats.samples, stats.bad, stats.blank) == (2, 3, 1)
    assert TokenizedDataset(out)[1].tolist() == sp.encode("two")


BAD_INPUTS = {
    "malformed JSON line": ("in.jsonl", b'{"text": "ok"}\n{"text": "no end\n', [], r"in\.jsonl:2: malformed JSON"),
    "invalid UTF-8": ("in.txt", b"fine\nalso fine\nbad \xff byte\n", [], r"in\.txt:3: invalid UTF-8"),
    "invalid UTF-8 in json": ("in.json", b'[\n{"text": "a"},\n{"text": "\xc3("}\n]', [], r"in\.json:3: invalid UTF-8"),
    "malformed json list": ("in.json", b'[\n{"text": "a"},\n{"text": "b"\n]', [], r"in\.json:4: malformed JSON"),
    "missing text key": ("in.jsonl", b'{"content": "a"}\n', [], r"in\.jsonl:1: no string field 'text'"),
    "unknown extension": ("in.csv", b"a,b\n", [], r"unsupported input format 'csv'"),
    "empty input": ("in.txt", b"\n  \n\n", [], r"no samples .*nothing was written"),
    "missing tokenizer": ("in.txt", b"hello\n", ["--tokenizer_path", "no/such/V7_sft.model"],
                          r"V7_sft\.model not found; give a SentencePiece model file, a Hugging Face tokenizer "
                          r"folder or its tokenizer\.json \(evods' default is InternLM's V7_sft\.model, from the "
                          r"tools/ folder"),
    "tokenizer folder without tokenizer.json": ("in.txt", b"hello\n", ["--tokenizer_path", "tools"],
                                                r"tokenizer folder tools has no tokenizer\.json; give a Hugging Face "
                                                r"tokenizer or model folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, tokenizer_path, case):
    name, content, extra, message = BAD_INPUTS[case]
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out" / "data.bin"
    args = ["--text_input_path", src, "--bin_output_path", out]
    result = tokenize_cli(*args, *(extra or ["--tokenizer_path", tokenizer_path]))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tokenizer.py: ") and "Traceback" not in result.stderr
    assert re.search(message, last), last
    assert outputs(out) == [] and leftovers(tmp_path) == []


def test_existing_output_is_refused_by_the_cli_and_kept(tmp_path, raw_data, tokenizer_path):
    out = tmp_path / "out.bin"
    out.write_text("precious\n")
    result = tokenize_cli("--text_input_path", raw_data, "--bin_output_path", out, "--tokenizer_path", tokenizer_path)
    assert result.returncode == 1 and "already exists: pass --overwrite" in result.stderr
    assert out.read_text() == "precious\n"


def test_interrupted_run_leaves_no_pair(tmp_path, raw_data, tokenizer_path, monkeypatch):
    out = tmp_path / "out.bin"
    tokenize_file(raw_data, out, tokenizer_path, progress=False)
    old = [p.read_bytes() for p in outputs(out)]

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("evods.data.binfile.BinWriter._write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_file(raw_data, out, tokenizer_path, mode="append", progress=False)
    assert [p.read_bytes() for p in outputs(out)] == old and leftovers(tmp_path) == []


# ---- alpaca

def _bin_lines(path):
    return Path(path).read_text().splitlines()


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_alpaca_template_masking_and_split_without_duplicates(tmp_path, data_dir, tokenizer_path, sp, name):
    src = data_dir / "alpaca" / name
    result = run_tool("alpaca_tokenizer.py", src, tmp_path / "out", tokenizer_path, "--split_ratio", "0.1")
    assert result.returncode == 0, result.stderr
    records = json.loads(src.read_text(encoding="utf-8"))
    train, valid = (_bin_lines(tmp_path / "out" / s / "en" / "dataset.bin") for s in ("train", "valid"))
    assert len(valid) == int(len(records) * 0.1) and len(train) == len(records) - len(valid)
    tokenize_alpaca(src, tmp_path / "all", tokenizer_path, split_ratio=0)
    everything = _bin_lines(tmp_path / "all" / "train" / "en" / "dataset.bin")
    assert sorted(train + valid) == sorted(everything)  # every record exactly once across the two splits
    for i in (0, 1, len(records) - 1):
        record, tokens = records[i], json.loads(everything[i])["tokens"]
        user = f"<|User|>:{record['instruction']}" + (f"\n{record['input']}" if record["input"] else "")
        prompt = [1] + [-t for t in sp.encode(user) + [103027, 13] + sp.encode("<|Bot|>:")]
        expected = (prompt + sp.encode(record["output"]) + [103028, 13])[:2047] + [2]
        assert tokens == expected
    for split in ("train", "valid"):
        dataset = TokenizedDataset(tmp_path / "out" / split / "en" / "dataset.bin")
        assert max(dataset.lengths) <= 2048


def test_alpaca_reads_a_saved_hf_dataset_and_refuses_existing_output(tmp_path, data_dir, tokenizer_path):
    import datasets

    records = json.loads((data_dir / "alpaca" / "alpaca_en_demo.json").read_text())[:20]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    assert tokenize_alpaca(tmp_path / "hf", tmp_path / "out", tokenizer_path, 0.25) == {"train": 15, "valid": 5}
    with pytest.raises(DataError, match="already exists"):
        tokenize_alpaca(tmp_path / "hf", tmp_path / "out", tokenizer_path, 0.25)
    assert tokenize_alpaca(tmp_path / "hf", tmp_path / "out", tokenizer_path, 0.25, overwrite=True)["valid"] == 5


def test_alpaca_internevo_special_ids_give_internevos_bytes(tmp_path, data_dir, tokenizer_path, sp, monkeypatch):
    """InternEvo's tools/alpaca_tokenizer.py writes <eoh>=103167, <eoa>=103166 (unused pieces in V7_sft.model)."""
    records = json.loads((data_dir / "alpaca" / "alpaca_en_demo.json").read_text())[:30]
    (tmp_path / "few.json").write_text(json.dumps(records))
    spec = importlib.util.spec_from_file_location("alpaca_tool", REPO / "tools" / "alpaca_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # the CLI in this process: the subprocess start costs more than the work
    monkeypatch.setattr(sys, "argv", ["alpaca_tokenizer.py", str(tmp_path / "few.json"), str(tmp_path / "out"),
                                      str(tokenizer_path), "--split_ratio", "0", "--internevo_special_ids"])
    tool.main()
    expected = ""
    for record in records:  # InternEvo's tokenize(): ids as it writes them, one json.dumps line per sample
        user = f"<|User|>:{record['instruction']}" + (f"\n{record['input']}" if record["input"] else "")
        tokens = [1] + [-t for t in sp.encode(user) + [103167, 13]] + [-t for t in sp.encode("<|Bot|>:")]
        tokens = (tokens + sp.encode(record["output"]) + [103166, 13])[:2047] + [2]
        expected += json.dumps({"tokens": tokens}) + "\n"
    assert (tmp_path / "out" / "train" / "en" / "dataset.bin").read_text() == expected


def bin_tokens(bin_path) -> list[list[int]]:
    """The token lists of a .bin, checked against its .meta (byte offset, token count per line)."""
    lines = Path(bin_path).read_bytes().splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line) for line in lines[:-1]])
    tokens = [json.loads(line)["tokens"] for line in lines]
    meta = np.load(f"{bin_path}.meta")
    assert meta.dtype == np.int32 and meta.tolist() == [[int(o), len(t)] for o, t in zip(offsets, tokens)]
    return tokens


def test_hf_tokenizer_gives_autotokenizers_ids_for_every_line(tmp_path, data_dir):
    """A Llama-3-shaped tokenizer.json (byte-level BPE trained on the shipped samples, BOS added by its own
    post-processor): --tokenizer_path a folder or the tokenizer.json gives AutoTokenizer's ids in the same bin/meta."""
    from transformers import AutoTokenizer

    from evods.data.tokenizer_model import check_tokenizer_fits
    from testkit.chat_models import llama3_tokenizer_folder

    folder = llama3_tokenizer_folder(tmp_path / "llama3")
    auto = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    source = data_dir / "pretrain_en" / "c4_demo.jsonl"
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    texts = [text for text in texts if text]
    assert len(texts) == 50
    # the folder, with BOS/EOS: the BOS is the one AutoTokenizer adds itself, the EOS the folder's eos_token
    tokenize_file(source, tmp_path / "bos_eos.bin", folder, add_bos=True, add_eos=True, progress=False)
    assert bin_tokens(tmp_path / "bos_eos.bin") == [auto(text).input_ids + [auto.eos_token_id] for text in texts]
    # the tokenizer.json alone (no tokenizer_config.json beside it): the text's own tokens
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    tokenize_file(source, tmp_path / "raw.bin", tmp_path / "lone" / "tokenizer.json", progress=False)
    assert bin_tokens(tmp_path / "raw.bin") == [auto(text, add_special_tokens=False).input_ids for text in texts]
    # a BOS that the tokenizer does not define, an Alpaca template it cannot write: one line each, nothing written
    with pytest.raises(DataError, match=r"^--add_bos: the tokenizer .*tokenizer\.json defines no bos_token "
                                        r"\(tokenizer_config\.json\); leave --add_bos out"):
        tokenize_file(source, tmp_path / "no_bos.bin", tmp_path / "lone" / "tokenizer.json", add_bos=True,
                      progress=False)
    with pytest.raises(DataError, match=r"^the tokenizer has no '<eoh>' piece"):
        tokenize_alpaca(data_dir / "alpaca" / "alpaca_en_demo.json", tmp_path / "sft", folder)
    assert not outputs(tmp_path / "no_bos.bin") and not (tmp_path / "sft").exists()
    # the vocabulary check at training start counts the added special tokens
    check_tokenizer_fits(folder, len(auto))
    with pytest.raises(DataError, match=rf"has {len(auto)} ids but the model has vocab_size={len(auto) - 1}"):
        check_tokenizer_fits(folder, len(auto) - 1)
