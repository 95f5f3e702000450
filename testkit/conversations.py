"""A multi-turn conversation (system prompt, three turns, non-ASCII text) and readers of what tools/chat_tokenizer.py
writes, for the data tool's tests and the template tests."""
from pathlib import Path

from evods.data.binfile import TokenizedDataset

SYSTEM = "你是一个乐于助人的助手. Answer briefly."
TURNS = [("Hello, who are you?", "I am a small model, 很高兴认识你."),
         ("Traduis « café crème » en anglais.", "Coffee with cream — très bien."),
         ("2+2?", "4, of course 😀")]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    {"role": role, "content": text} for query, reply in TURNS for role, text in (("user", query), ("assistant", reply))]


def samples(path: Path) -> list[list[int]]:
    """The token lists of a .bin file."""
    dataset = TokenizedDataset(path)
    return [dataset[i].tolist() for i in range(len(dataset))]


def trained_runs(tokens) -> list[list[int]]:
    """The maximal runs of trained (positive) ids of a sample."""
    runs, run = [], []
    for token in [*tokens, 0]:
        if token > 0:
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    return runs
