"""Conversations as fine-tuning data, in the model's chat format: the logic behind tools/chat_tokenizer.py.

Records (a JSON list or JSONL file, or a local Hugging Face dataset), in any of these forms:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}                 OpenAI-style
    {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...], "system": "..."}   ShareGPT
    {"instruction": "...", "input": "...", "output": "...", "system": "...", "history": [["q", "r"], ...]}   Alpaca
("system" and "history" are optional; ShareGPT also takes "user"/"assistant" as `from`.)

A conversation is rendered by transformers' `apply_chat_template` with the model's chat template and tokenized whole
by the tokenizer an export writes, both given by the caller (tools/chat_tokenizer.py: a template of
evods.model.chat_templates or the tokenizer folder's own, the files of evods.checkpoint.formats.hf_tokenizer): its ids
are those of the exported folder's `apply_chat_template(messages)`. Labels follow InternEvo's
SFT convention: a token is written negative (no loss) unless it belongs to an assistant turn, the reply and the end of
turn the template puts after it (`<eoa>`, `<|im_end|>`, `<|eot_id|>`). The turns are found by rendering: a reply starts
where the conversation before it plus the generation prompt ends, and ends where the conversation up to and including
it ends, less trailing whitespace (the newline after `<eoa>` or `<|im_end|>` opens the next turn). A token is the
reply's when its first character is. Id 0 cannot be written negative: where it is a real token (not InternLM's
`<unk>`), it is never trained, and the summary counts it.

Longer than `max_length` tokens: "truncate" keeps the conversation up to the end of its last reply that ends within
`max_length` (one whose first reply ends past it is dropped); "drop" drops it. The summary counts both.

The validation split is int(N * split_ratio) records drawn without replacement, as tools/alpaca_tokenizer.py does.
Output bytes are the same for every worker count.
"""
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evods.data.alpaca import alpaca_query
from evods.data.binfile import format_bin_lines
from evods.data.errors import DataError
from evods.data.splits import SPLITS, SplitWriters, split_paths, validation_mask
from evods.data.tokenize import InOrderPool, duration_and_rate, input_format, read_chunks

OVERLONG = ("truncate", "drop")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
HF_CHUNK_ROWS = 1024
# Rendering the template and encoding costs about a second per MiB: chunks of a quarter MiB keep every worker busy
# to the end of the input instead of one finishing the last large chunk alone.
CHUNK_BYTES = 1 << 18
PRINTED_BAD_RECORDS = 20


class BadRecord(ValueError):
    """A record that is not a conversation this tool can train on; the message says why."""


@dataclass(frozen=True)
class ChatJob:
    """What a worker needs besides the tokenizer."""
    fmt: str  # "jsonl" (raw lines), "json" or "hf" (parsed records)
    jinja: str
    max_length: int
    overlong: str


@dataclass
class ChatStats:
    conversations: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    bad: int = 0
    untrainable_zero_ids: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def add(self, other: "ChatStats") -> None:
        for split in SPLITS:
            self.conversations[split] += other.conversations[split]
        for name in ("tokens", "trained_tokens", "truncated", "dropped", "bad", "untrainable_zero_ids"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, output, template: str, max_length: int) -> str:
        zero = (f"; {self.untrainable_zero_ids} reply tokens have id 0, which InternEvo's labels cannot mark as "
                "trained" if self.untrainable_zero_ids else "")
        return (f"wrote {self.conversations['train']} train and {self.conversations['valid']} valid conversations "
                f"({self.tokens} tokens, {self.trained_tokens} trained) in the {template} format under {output}; "
                f"longer than {max_length} tokens: {self.truncated} truncated, {self.dropped} dropped; skipped "
                f"{self.bad} bad records{zero}; {duration_and_rate(self.seconds, self.input_bytes)}")


# ---- records to messages

def record_messages(record) -> list[dict]:
    """The conversation of a record as chat-template messages; BadRecord if it is not one."""
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}, not a record")
    if "messages" in record:
        messages = _turns(record["messages"], "messages", "role", "content", MESSAGE_ROLES)
    else:
        if "conversations" in record:
            messages = _turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        elif "instruction" in record and "output" in record:
            messages = _alpaca_turns(record)
        else:
            raise BadRecord(f"not a conversation (keys: {', '.join(map(str, record)) or 'none'}); expected "
                            "'messages' (role/content), 'conversations' (from/value) or Alpaca's "
                            "instruction/input/output")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRecord(f"'system' is a {type(system).__name__}, not text")
        if system:
            messages = [{"role": "system", "content": system}, *messages]
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise BadRecord("no assistant turn: nothing to train on")
    if roles[0] == "assistant":
        raise BadRecord("the conversation starts with an assistant turn; a user or system turn must come first")
    return messages


def _turns(turns, key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"'{key}' must be a non-empty list of {{{role_key!r}, {content_key!r}}} objects")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise BadRecord(f"'{key}' item {number} is not a {{{role_key!r}, {content_key!r}}} object")
        role, content = turn[role_key], turn[content_key]
        if role not in roles:
            raise BadRecord(f"'{key}' item {number} has the unknown role {role!r} (known: {', '.join(roles)})")
        if not isinstance(content, str):
            raise BadRecord(f"'{key}' item {number}: {content_key!r} is a {type(content).__name__}, not text")
        messages.append({"role": roles[role], "content": content})
    return messages


def _alpaca_turns(record: dict) -> list[dict]:
    fields = {name: record.get(name) or "" for name in ("instruction", "input", "output")}
    history = record.get("history") or []
    if any(not isinstance(value, str) for value in fields.values()) or not isinstance(history, list) or any(
            not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(t, str) for t in pair)
            for pair in history):
        raise BadRecord("Alpaca fields must be text, and 'history' a list of [query, reply] pairs")
    messages = [{"role": role, "content": text} for query, reply in history
                for role, text in (("user", query), ("assistant", reply))]
    return [*messages, {"role": "user", "content": alpaca_query(fields["instruction"], fields["input"])},
            {"role": "assistant", "content": fields["output"]}]


# ---- messages to token ids and labels

def render_conversations(tokenizer, jinja: str, conversations: list[list[dict]], generation_prompt: bool) -> list:
    """The rendered text of each conversation, or the template's error message where it refuses one."""
    from jinja2 import TemplateError

    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError:  # one conversation refused: find which
        rendered = []
        for conversation in conversations:
            try:
                rendered.append(tokenizer.apply_chat_template(conversation, chat_template=jinja, tokenize=False,
                                                              add_generation_prompt=generation_prompt))
            except TemplateError as error:
                rendered.append(BadRecord(f"the chat template refuses it: {error}"))
        return rendered


def render_with_replies(tokenizer, jinja: str, conversations: list[list[dict]]) -> list:
    """For each conversation, (its text, [(start, end) character span of each reply and its end of turn]), or a
    BadRecord."""
    replies = [[i for i, message in enumerate(messages) if message["role"] == "assistant"]
               for messages in conversations]
    full = render_conversations(tokenizer, jinja, conversations, False)
    prompts = [messages[:i] for messages, turns in zip(conversations, replies) for i in turns]
    with_reply = [messages[:i + 1] for messages, turns in zip(conversations, replies) for i in turns
                  if i + 1 < len(messages)]
    before = iter(render_conversations(tokenizer, jinja, prompts, True))
    through = iter(render_conversations(tokenizer, jinja, with_reply, False))
    results = []
    for messages, turns, text in zip(conversations, replies, full):
        prefixes = [(next(before), text if i + 1 == len(messages) else next(through)) for i in turns]
        problem = next((p for p in (text, *(x for pair in prefixes for x in pair)) if isinstance(p, BadRecord)), None)
        if problem is None and not all(text.startswith(upto) and upto.startswith(start) for start, upto in prefixes):
            problem = BadRecord("the chat template renders a turn differently once later turns follow, so its "
                                "replies cannot be located")
        results.append(problem or (text, [(len(start), len(upto.rstrip())) for start, upto in prefixes]))
    return results


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], max_length: int,
                 overlong: str) -> tuple[np.ndarray | None, bool, int]:
    """(the token ids, negative outside the replies, or None when dropped; whether they were truncated; how many
    reply tokens have id 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    bounds = np.asarray([b for span in spans if span[1] > span[0] for b in span], dtype=np.int64)
    in_reply = np.searchsorted(bounds, starts, side="right") % 2 == 1
    labelled = np.where(in_reply, ids, -ids)
    zero_ids = int((in_reply & (ids == 0)).sum())
    if len(ids) <= max_length:
        return labelled, False, zero_ids
    if overlong == "drop":
        return None, False, 0
    reply_ends = np.searchsorted(starts, bounds[1::2], side="left")  # first token after each reply
    fitting = reply_ends[reply_ends <= max_length]
    if not len(fitting):
        return None, False, 0
    return labelled[:fitting.max()], True, int((in_reply & (ids == 0))[:fitting.max()].sum())


def encode_chunk(tokenizer, items, job: ChatJob):
    """One chunk of (position, record or raw line, split or None for a blank line): ({split: format_bin_lines
    output}, ChatStats, [(position, reason)] of bad records)."""
    stats, bad = ChatStats(), []
    conversations, kept = [], []
    for position, payload, split in items:
        if split is None:
            continue
        try:
            if job.fmt == "jsonl":
                try:
                    payload = json.loads(payload)
                except ValueError as error:  # malformed JSON or UTF-8
                    raise BadRecord(f"not a JSON record ({error})") from None
            conversations.append(record_messages(payload))
            kept.append((position, split))
        except BadRecord as error:
            bad.append((position, str(error)))
    rendered = render_with_replies(tokenizer, job.jinja, conversations)
    texts = [result[0] for result in rendered if not isinstance(result, BadRecord)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    samples = {split: [] for split in SPLITS}
    index = 0
    for (position, split), result in zip(kept, rendered):
        if isinstance(result, BadRecord):
            bad.append((position, str(result)))
            continue
        ids, offsets = encoded["input_ids"][index], encoded["offset_mapping"][index]
        index += 1
        tokens, truncated, zero_ids = label_tokens(ids, offsets, result[1], job.max_length, job.overlong)
        if tokens is None:
            stats.dropped += 1
            continue
        stats.truncated += truncated
        stats.untrainable_zero_ids += zero_ids
        stats.conversations[split] += 1
        stats.tokens += len(tokens)
        stats.trained_tokens += int((tokens > 0).sum())
        samples[split].append(tokens.tolist())
    stats.bad = len(bad)
    bad.sort()
    return {split: format_bin_lines(lists) for split, lists in samples.items()}, stats, bad


def _load_fast_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, use_fast=True, local_files_only=True)


# ---- reading

def _record_chunks(input_path: Path, fmt: str, dataset):
    """(items, input size) chunks of (position, record or raw line), as read_chunks gives them for files."""
    if fmt != "hf":
        yield from read_chunks(input_path, fmt, CHUNK_BYTES)
        return
    for start in range(0, len(dataset), HF_CHUNK_ROWS):
        batch = dataset[start:start + HF_CHUNK_ROWS]
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        yield list(enumerate(rows, start + 1)), len(rows)


def _is_blank(fmt: str, payload) -> bool:
    return fmt == "jsonl" and not payload.strip()


def _count_records(input_path: Path, fmt: str, dataset) -> int:
    """Records in the input (blank JSONL lines are none), for the validation split."""
    if fmt == "hf":
        return len(dataset)
    return sum(sum(not _is_blank(fmt, payload) for _, payload in items) for items, _ in read_chunks(input_path, fmt))


def _with_splits(chunks, fmt: str, is_valid: np.ndarray):
    """Each item with the split of its record (None for a blank line)."""
    ordinal = 0
    for items, size in chunks:
        tagged = []
        for position, payload in items:
            split = None
            if not _is_blank(fmt, payload):
                split = "valid" if is_valid[ordinal] else "train"
                ordinal += 1
            tagged.append((position, payload, split))
        yield tagged, size


# ---- the tool

def tokenize_conversations(input_path, output_path, tokenizer_files, *, type_name="en", split_ratio=0.1,
                           max_length=2048, overlong="truncate", workers=1, skip_bad_lines=False, overwrite=False,
                           progress=True) -> ChatStats:
    """Write {output}/train/{type}/{name}.bin(.meta) and {output}/valid/{type}/{name}.bin(.meta) (name: the input's
    file or folder name without extension); return the counts. `tokenizer_files(folder)` writes the tokenizer files
    of the model into `folder` (the workers load them from there) and returns (the fast tokenizer they make, the chat
    template as Jinja); it is called once the options are checked. DataError on bad input: without `skip_bad_lines`
    the first bad record stops the run and nothing is written."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise DataError(f"{input_path}: no such file or folder")
    if overlong not in OVERLONG:
        raise DataError(f"--overlong {overlong!r}: use {' or '.join(OVERLONG)}")
    if max_length < 2 or workers < 1:
        raise DataError(f"give --max_length >= 2 and --workers >= 1 (not {max_length} and {workers})")
    hf = input_path.is_dir() or input_path.suffix.lower() == ".parquet"
    fmt = "hf" if hf else input_format(input_path)
    if fmt == "txt":
        raise DataError(f"{input_path}: conversations come as .json, .jsonl or a Hugging Face dataset, not .txt")
    validation_mask(0, split_ratio)  # checks the ratio before anything is read
    from evods.data.hf_source import open_hf_dataset

    dataset = open_hf_dataset(input_path) if hf else None
    where = (lambda n: f"{input_path} row {n}") if hf else (lambda n: f"{input_path}:{n}")
    stats = ChatStats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evods-chat-tokenizer-") as tokenizer_folder:
        tokenizer, jinja = tokenizer_files(tokenizer_folder)
        job = ChatJob(fmt, jinja, max_length, overlong)
        # the workers start (and, without fork, load their tokenizers) while the records are counted
        pool = InOrderPool(workers, encode_chunk, _load_fast_tokenizer, tokenizer_folder, tokenizer) \
            if workers > 1 else None
        writers = None
        try:
            is_valid = validation_mask(_count_records(input_path, fmt, dataset), split_ratio)
            if not len(is_valid):
                raise DataError(f"{input_path} has no records; nothing was written")
            planned = {"train": int((~is_valid).sum()), "valid": int(is_valid.sum())}
            writers = SplitWriters(split_paths(output_path, type_name, f"{input_path.stem}.bin"), planned, overwrite)
            total = len(dataset) if hf else input_path.stat().st_size
            with tqdm(total=total, unit="rows" if hf else "B", unit_scale=not hf, unit_divisor=1024,
                      desc=input_path.name, disable=not progress) as bar:
                chunks = _with_splits(_record_chunks(input_path, fmt, dataset), fmt, is_valid)
                results = pool.map(chunks, job) if pool else \
                    ((encode_chunk(tokenizer, items, job), size) for items, size in chunks)
                for (formatted, chunk_stats, bad), size in results:
                    _report_bad(bad, stats.bad, where, skip_bad_lines)
                    for split, lines in formatted.items():
                        writers.write_formatted(split, *lines)
                    stats.add(chunk_stats)
                    if not hf:
                        stats.input_bytes += size
                    bar.update(size)
            if not writers.samples("train"):
                raise DataError(f"{input_path}: no conversation for the train split ({stats.bad} bad, "
                                f"{stats.dropped} dropped as longer than --max_length {max_length}); nothing was "
                                "written")
            writers.commit()
        except BaseException:
            if writers is not None:
                writers.abort()
            raise
        finally:
            if pool:
                pool.close()
    if hf:
        stats.input_bytes = int(dataset.data.nbytes)
    stats.seconds = time.perf_counter() - start
    return stats


def _report_bad(bad, already: int, where, skip: bool) -> None:
    """The first bad record stops the run, unless skipped: then one line each (the first ones) on stderr."""
    if bad and not skip:
        position, reason = bad[0]
        raise DataError(f"{where(position)}: {reason} (--skip_bad_lines skips such records)")
    for number, (position, reason) in enumerate(bad, already + 1):
        if number <= PRINTED_BAD_RECORDS:
            print(f"{where(position)}: {reason}; skipped", file=sys.stderr)
        if number == PRINTED_BAD_RECORDS:
            print("(further bad records are skipped without a line; the summary counts them)", file=sys.stderr)
