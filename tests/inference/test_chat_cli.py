"""tools/chat.py driven through a pseudo-terminal, as a person types (issue: inference people use): two turns whose
replies are the model's greedy chat with the history, /reset, Ctrl-C in the middle of a reply, control characters of
a reply shown escaped, and one clear line for a bad folder, a folder without a tokenizer, a training checkpoint (in
every inference command) and a prompt past the context with origin RoPE."""
import io
import os
import re
import signal
import sys

import pexpect
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evods.cli.chat import BOT, USER
from evods.cli.chat import main as chat_main
from evods.cli.eval_long_context import main as eval_long_context_main
from evods.cli.generate import main as generate_main
from evods.cli.serve import main as serve_main
from evods.cli.web_demo import main as web_demo_main
from testkit.chat_models import scripted_chat_folder, tiny_chat_folder
from testkit.checkpoints import write_evods_checkpoint
from testkit.paths import REPO

TIMEOUT = 120  # start-up on a loaded 2-core machine (imports torch and transformers)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("chat_cli") / "hf")


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "TRANSFORMERS_VERBOSITY": "error"}
    # Ctrl-C as a terminal's shell leaves it: a test run started in the background (CI) has SIGINT ignored, which the
    # child would inherit, and Python then leaves it ignored
    return pexpect.spawn(sys.executable, [str(REPO / "tools" / "chat.py"), *args], cwd=str(REPO), env=env,
                         encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 400),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_reply(chat: pexpect.spawn) -> str:
    chat.expect_exact(BOT)
    chat.expect_exact("\r\n" + USER)
    return chat.before.replace("\r\n", "\n")  # the terminal's line ends


def test_two_turns_reset_and_ctrl_c(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    greedy = dict(do_sample=False, max_new_tokens=10)
    first, history = model.chat(tokenizer, "Hello", **greedy)
    second, _ = model.chat(tokenizer, "How are you?", history, **greedy)
    alone, _ = model.chat(tokenizer, "How are you?", **greedy)
    assert second != alone  # the history changes the reply

    chat = spawn("--model", str(folder), "--temperature", "0", "--max_new_tokens", "10")
    chat.expect_exact(USER)
    chat.sendline("Hello")
    assert read_reply(chat) == first
    chat.sendline("How are you?")
    assert read_reply(chat) == second
    chat.sendline("/reset")
    chat.expect_exact("(conversation forgotten)")
    chat.sendline("How are you?")
    assert read_reply(chat) == alone
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0

    # a reply of up to 5,000 tokens, stopped once it has begun: back at the prompt, and still chatting
    chat = spawn("--model", str(folder), "--temperature", "0", "--max_new_tokens", "5000", "--max_context", "6000")
    chat.expect_exact(USER)
    chat.sendline("Tell me a long story")
    chat.expect_exact(BOT)
    chat.expect(r"\S{3}")  # the reply is being printed
    chat.sendintr()
    chat.expect_exact("(stopped)", timeout=30)
    chat.expect_exact(USER)
    chat.sendintr()  # Ctrl-C at the prompt does not quit
    chat.expect_exact("(/exit or Ctrl-D quits)")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def run_chat(capsys, *args: str) -> tuple[int, str]:
    """tools/chat.py in this process (no start-up to wait for): (exit code, stderr)."""
    code = chat_main(list(args))
    return code, capsys.readouterr().err


def test_bad_folder_missing_tokenizer_and_origin_prompt_past_the_context_are_one_line(folder, tmp_path, capsys,
                                                                                        monkeypatch):
    code, err = run_chat(capsys, "--model", str(tmp_path / "nowhere"))
    assert code == 1 and err.strip().endswith(
        f": --model {tmp_path / 'nowhere'}: no such folder (give a folder written by tools/convert2hf.py)")
    assert len(err.strip().splitlines()) == 1

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(folder / name)
    code, err = run_chat(capsys, "--model", str(bare))
    assert code == 1
    expected = r"\S+: --model \S+ has no tokenizer; convert with --tokenizer tools/V7_sft\.model.*"
    assert re.fullmatch(expected, err.strip())

    long_query = " ".join(["word"] * 100)  # the tiny model has 64 positions
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": long_query}], add_generation_prompt=True,
                                           tokenize=False)
    tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert tokens > 100
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_query}\n/exit\n"))
    code, err = run_chat(capsys, "--model", str(folder), "--rotary_type", "origin")
    assert code == 0
    assert [line for line in err.splitlines() if "prompt" in line] == [
        f"the prompt is {tokens} tokens, past the context of 64 (max_position_embeddings with origin RoPE; shorten "
        "it, or use --rotary_type dynamic)"]


def test_generate_from_a_missing_folder_is_one_line_not_a_hub_lookup(tmp_path, capsys):
    code = generate_main(["--model", str(tmp_path / "nowhere"), "--token_ids", "1,2"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.endswith(f": --model {tmp_path / 'nowhere'}: no config.json there; give a folder written "
                                      "by tools/convert2hf.py")
    assert len(err.splitlines()) == 1


# What a model may send: ESC [2J clears a terminal, backspace and carriage return wipe what was printed, BEL rings.
CONTROL_REPLY = "\x1b[2Jok\x08\r\x07 done"
SHOWN = r"\x1b[2Jok\x08\x0d\x07 done"


def test_control_characters_in_a_reply_are_shown_escaped(tmp_path, capsys, monkeypatch):
    folder = scripted_chat_folder(tmp_path / "scripted", CONTROL_REPLY)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.chat(tokenizer, "Hello", do_sample=False)[0] == CONTROL_REPLY
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd?\n/exit\n"))
    assert chat_main(["--model", str(folder), "--temperature", "0", "--max_new_tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{BOT}{SHOWN}\n") == 2, out  # streamed piece by piece, escaped piece by piece
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), "a control character reached the terminal"

    # generate prints the decoded tokens the same way
    assert generate_main(["--model", str(folder), "--prompt", "<|User|>:Hello<eoh>\n<|Bot|>:",
                          "--max_new_tokens", "9"]) == 0
    assert capsys.readouterr().out == f"{SHOWN}\n"


def test_a_training_checkpoint_given_to_the_inference_tools_says_to_convert_it(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt" / "40"
    write_evods_checkpoint(checkpoint)
    expected = (f"--model {checkpoint} is a training checkpoint, not a Hugging Face folder: convert it first (python "
                f"tools/convert2hf.py --src {checkpoint} --tgt hf/ckpt_40 --tokenizer tools/V7_sft.model; "
                "evods-convert2hf once installed), then give --model hf/ckpt_40")
    text = tmp_path / "text.txt"
    text.write_text("Some text.")
    for tool, extra in ((chat_main, []), (web_demo_main, []), (generate_main, ["--prompt", "Hi"]),
                        (serve_main, ["--port", "0"]), (eval_long_context_main, ["--text", str(text)])):
        code = tool(["--model", str(checkpoint), *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.strip().split(": ", 1)[1] == expected, (tool, err)
        assert len(err.splitlines()) == 1
