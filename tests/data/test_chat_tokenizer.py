"""tools/chat_tokenizer.py (issue: conversations as fine-tuning data): messages, ShareGPT and Alpaca records of one
conversation give the same tokens, with only the replies and their end of turn trained; splits, type folders, worker
counts, over-long conversations, local HF datasets, the template's choice and bad records behave as the README says.
(That the ids are those of the exported folder's `apply_chat_template`: tests/inference/test_chat_templates.py.)"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from evods.checkpoint.formats.hf_tokenizer import write_tokenizer
from evods.data.binfile import TokenizedDataset
from evods.model.chat_templates import INTERNLM
from testkit.chat_models import llama3_tokenizer_folder
from testkit.conversations import MESSAGES, SYSTEM, TURNS, samples, trained_runs
from testkit.paths import DATA, TOKENIZER
from tools.chat_tokenizer import main as chat_tokenizer

SHAREGPT = {"system": SYSTEM, "conversations": [
    {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in MESSAGES[1:]]}
ALPACA = {"system": SYSTEM, "history": [list(turn) for turn in TURNS[:-1]], "instruction": TURNS[-1][0], "input": "",
          "output": TURNS[-1][1]}


@pytest.fixture(scope="module")
def internlm_folder(tmp_path_factory) -> Path:
    """InternLM's tokenizer files as an export writes them (a model folder is a tokenizer the tool takes)."""
    folder = tmp_path_factory.mktemp("internlm_tokenizer")
    write_tokenizer(str(TOKENIZER), str(folder), 2048, INTERNLM)
    return folder


@pytest.fixture(scope="module")
def tokenizer(internlm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(internlm_folder)


def tool(*args) -> int:
    return chat_tokenizer([*map(str, args), "--quiet"])


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def test_messages_sharegpt_and_alpaca_give_one_conversation_with_only_replies_trained(tmp_path, internlm_folder,
                                                                                    tokenizer, capsys):
    write_jsonl(tmp_path / "messages.jsonl", [{"messages": MESSAGES}])
    (tmp_path / "sharegpt.json").write_text(json.dumps([SHAREGPT], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "alpaca.json").write_text(json.dumps([ALPACA], ensure_ascii=False), encoding="utf-8")
    written = {}
    for name in ("messages.jsonl", "sharegpt.json", "alpaca.json"):
        assert tool(tmp_path / name, tmp_path / "out", "--tokenizer_path", internlm_folder, "--split_ratio", 0) == 0
        assert "in the internlm format" in capsys.readouterr().err
        written[name] = samples(tmp_path / "out" / "train" / "en" / f"{Path(name).stem}.bin")
    assert written["messages.jsonl"] == written["sharegpt.json"] == written["alpaca.json"]
    [tokens] = written["messages.jsonl"]
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert [abs(t) for t in tokens] == tokenizer(prompt, add_special_tokens=False).input_ids
    # InternEvo's SFT labels: exactly the replies and the <eoa> after each, nothing of the prompt or the newline
    assert [tokenizer.decode(run) for run in trained_runs(tokens)] == [reply + "<eoa>" for _, reply in TURNS]
    untrained = prompt
    for _, reply in TURNS:
        untrained = untrained.replace(reply + "<eoa>", "", 1)
    assert tokenizer.decode([-t for t in tokens if t < 0]) == untrained


def test_splits_type_folders_and_workers(tmp_path, internlm_folder, capsys, monkeypatch):
    source = DATA / "chat" / "sharegpt_en_demo.json"
    monkeypatch.setattr("evods.data.chat.CHUNK_BYTES", 8192)  # many chunks, so both workers get some
    records = json.loads(source.read_text(encoding="utf-8"))
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert tool(source, out, "--tokenizer_path", internlm_folder, "--type", "chat", "--workers", workers) == 0
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(rf"wrote 180 train and 20 valid conversations \(\d+ tokens, \d+ trained\) in the internlm "
                            rf"format under {out}; longer than 2048 tokens: 0 truncated, 0 dropped; skipped 0 bad "
                            r"records; [\d.]+ s \([\d.]+ MB/s\)", summary), summary
        outputs[workers] = {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*.bin*"))}
    assert sorted(map(str, outputs[1])) == ["train/chat/sharegpt_en_demo.bin", "train/chat/sharegpt_en_demo.bin.meta",
                                            "valid/chat/sharegpt_en_demo.bin", "valid/chat/sharegpt_en_demo.bin.meta"]
    assert outputs[1] == outputs[2]  # byte-identical for any worker count
    train, valid = (samples(tmp_path / "w1" / split / "chat" / "sharegpt_en_demo.bin") for split in ("train", "valid"))
    assert len(train) + len(valid) == len(records) and len(valid) == int(len(records) * 0.1)
    assert len({tuple(t) for t in train} & {tuple(t) for t in valid}) <= 2  # the sample repeats a few conversations
    # an existing output is refused; --overwrite with no validation share removes the old validation pair
    assert tool(source, tmp_path / "w1", "--tokenizer_path", internlm_folder, "--type", "chat") == 1
    assert "already exists" in capsys.readouterr().err
    assert tool(source, tmp_path / "w1", "--tokenizer_path", internlm_folder, "--type", "chat", "--split_ratio", 0,
                "--overwrite") == 0
    assert not (tmp_path / "w1" / "valid" / "chat" / "sharegpt_en_demo.bin").exists()
    assert len(samples(tmp_path / "w1" / "train" / "chat" / "sharegpt_en_demo.bin")) == len(records)


def test_overlong_conversations_are_cut_after_a_reply_or_dropped(tmp_path, internlm_folder, tokenizer, capsys):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long_reply_first = {"messages": [{"role": "user", "content": "Tell me."},
                                     {"role": "assistant", "content": "word " * 300}]}
    src = write_jsonl(tmp_path / "long.jsonl", [{"messages": MESSAGES}, short, long_reply_first])
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False).input_ids
    eoa = tokenizer.convert_tokens_to_ids("<eoa>")
    second_reply_end = [i for i, token in enumerate(ids) if token == eoa][1] + 1
    limit = second_reply_end + 3  # within the third turn's prompt
    assert tool(src, tmp_path / "cut", "--tokenizer_path", internlm_folder, "--split_ratio", 0,
                "--max_length", limit) == 0
    assert f"longer than {limit} tokens: 1 truncated, 1 dropped" in capsys.readouterr().err
    first, kept_short = samples(tmp_path / "cut" / "train" / "en" / "long.bin")
    assert [abs(t) for t in first] == ids[:second_reply_end] and first[-1] == eoa  # ends with the 2nd reply's <eoa>
    assert len(kept_short) < limit
    assert tool(src, tmp_path / "drop", "--tokenizer_path", internlm_folder, "--split_ratio", 0,
                "--max_length", limit, "--overlong", "drop") == 0
    assert "0 truncated, 2 dropped" in capsys.readouterr().err
    assert samples(tmp_path / "drop" / "train" / "en" / "long.bin") == [kept_short]


def test_bad_records_are_one_line_each_with_file_and_line(tmp_path, internlm_folder, capsys):
    good = {"messages": MESSAGES}
    src = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "r"}]},
        '{"messages": [unquoted]}',
        "",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "r"}]},
        {"text": "pre-training text"},
        good,
    ])
    assert tool(src, tmp_path / "strict", "--tokenizer_path", internlm_folder) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f": {src}:2: no assistant turn: nothing to train on (--skip_bad_lines skips such records)")
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").rglob("*.bin*"))
    assert tool(src, tmp_path / "lenient", "--tokenizer_path", internlm_folder, "--split_ratio", 0,
                "--skip_bad_lines") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in err[:-1]] == [f"{src}:{n}" for n in (2, 3, 4, 6, 7)]
    assert "unknown role 'robot'" in err[1] and "not a JSON record" in err[2] and "unknown role 'bot'" in err[3]
    assert "not a conversation (keys: text)" in err[4] and all(line.endswith("; skipped") for line in err[:-1])
    assert "wrote 2 train and 0 valid conversations" in err[-1] and "skipped 5 bad records" in err[-1]
    assert len(samples(tmp_path / "lenient" / "train" / "en" / "bad.bin")) == 2


def test_the_template_comes_from_the_flag_the_tokenizer_or_its_tokens(tmp_path, internlm_folder, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    # a tokenizer without the template's special tokens: the run is refused, nothing written
    assert tool(src, tmp_path / "wrong", "--tokenizer_path", internlm_folder, "--template", "llama3") == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f": --template llama3: the tokenizer {internlm_folder} has no "
                    "<|start_header_id|>, <|end_header_id|>, <|eot_id|> token(s), which the 'llama3' chat template "
                    "needs; use that model family's tokenizer, or the template of this tokenizer's family")
    assert not (tmp_path / "wrong").exists()
    # a tokenizer folder without a template of its own: the registry template whose tokens it has
    llama3 = llama3_tokenizer_folder(tmp_path / "llama3")
    assert tool(src, tmp_path / "by_tokens", "--tokenizer_path", llama3, "--split_ratio", 0) == 0
    assert "in the llama3 format" in capsys.readouterr().err
    assert tool(src, tmp_path / "own", "--tokenizer_path", llama3, "--template", "tokenizer") == 1
    assert "has no chat_template of its own; use internlm, internlm2, llama3" in capsys.readouterr().err
    # its own template (here: a Llama-3 format spelt otherwise) is used by default and by --template tokenizer
    own = ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
           "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}")
    no_generation_prompt = llama3_tokenizer_folder(tmp_path / "llama3_no_prompt", chat_template=own)
    assert tool(src, tmp_path / "no_prompt", "--tokenizer_path", no_generation_prompt) == 1
    assert "writes nothing for add_generation_prompt" in capsys.readouterr().err
    own += "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    llama3_own = llama3_tokenizer_folder(tmp_path / "llama3_own", chat_template=own)
    for flag in ([], ["--template", "tokenizer"]):
        out = tmp_path / f"own{len(flag)}"
        assert tool(src, out, "--tokenizer_path", llama3_own, "--split_ratio", 0, *flag) == 0
        assert "in the tokenizer format" in capsys.readouterr().err
        assert samples(out / "train" / "en" / "chat.bin") == samples(tmp_path / "by_tokens" / "train" / "en" /
                                                                       "chat.bin")


def test_a_local_hf_dataset_gives_the_bytes_of_its_jsonl(tmp_path, internlm_folder):
    import datasets

    lines = (DATA / "chat" / "messages_zh_demo.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    src = write_jsonl(tmp_path / "zh.jsonl", lines)
    datasets.Dataset.from_list([json.loads(line) for line in lines]).to_parquet(str(tmp_path / "zh.parquet"))
    for name in ("zh.jsonl", "zh.parquet"):
        assert tool(tmp_path / name, tmp_path / name.replace(".", "_"), "--tokenizer_path", internlm_folder,
                    "--type", "cn") == 0
    for split in ("train", "valid"):
        from_jsonl, from_hf = (tmp_path / folder / split / "cn" for folder in ("zh_jsonl", "zh_parquet"))
        assert (from_jsonl / "zh.bin").read_bytes() == (from_hf / "zh.bin").read_bytes()
        assert np.array_equal(TokenizedDataset(from_jsonl / "zh.bin").lengths,
                              TokenizedDataset(from_hf / "zh.bin").lengths)
    assert src.exists()
