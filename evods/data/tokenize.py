"""Pretraining text (txt / jsonl / json, or the text column of a Hugging Face dataset) to a bin/meta pair: the logic
behind tools/tokenizer.py. The tokenizer itself comes from evods.data.tokenizer_model.

Streaming: the input is read in chunks of about 1 MiB, encoded (optionally in worker processes, results kept in input
order, at most a few chunks in flight) and appended to a BinWriter, so memory does not grow with the input and the
output is byte-identical for every worker count.
"""
import codecs
import contextlib
import json
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from evods.data.binfile import BinWriter, format_bin_lines
from evods.data.errors import DataError
from evods.data.hf_source import ENCODE_BATCH, TextEncoder, open_hf_dataset
from evods.data.tokenizer_model import find_tokenizer, load_tokenizer

FORMATS = ("txt", "jsonl", "json")
CHUNK_BYTES = 1 << 20
CHUNK_ITEMS = 4096
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"  # the Rust tokenizers' own thread pool
@dataclass(frozen=True)
class EncodeOptions:
    fmt: str
    text_key: str = "text"
    whole_record: bool = False
    add_bos: bool = False
    add_eos: bool = False


@dataclass
class TokenizeStats:
    samples: int = 0
    tokens: int = 0
    blank: int = 0
    bad: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def summary(self, output) -> str:
        return (f"wrote {self.samples} samples, {self.tokens} tokens to {output}; skipped {self.blank} blank and "
                f"{self.bad} bad lines; {duration_and_rate(self.seconds, self.input_bytes)}")


def duration_and_rate(seconds: float, input_bytes: int) -> str:
    """"12.3 s (4.56 MB/s)": how long a tool took and how fast it read, for its summary line."""
    return f"{seconds:.1f} s ({input_bytes / 2**20 / max(seconds, 1e-9):.2f} MB/s)"


def input_format(path) -> str:
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise DataError(f"{path}: unsupported input format {fmt or '(no extension)'!r}; use a .txt, .jsonl or "
                        ".json file")
    return fmt


# ---- reading: chunks of (line number, payload); payloads are raw line bytes (txt, jsonl) or parsed records (json)

def _line_chunks(path, chunk_bytes):
    items, size = [], 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            items.append((line_no, raw))
            size += len(raw)
            if size >= chunk_bytes or len(items) >= CHUNK_ITEMS:
                yield items, size
                items, size = [], 0
    if items:
        yield items, size


class _JsonListReader:
    """Streams the records of a JSON list with raw_decode over a sliding text buffer, tracking line numbers."""

    def __init__(self, path, chunk_bytes):
        self.path = path
        self._chunk_bytes = chunk_bytes
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buf, self._pos, self._line = "", 0, 1
        self._bytes_read = 0
        self._eof = False

    def _error(self, message, pos=None):
        line = self._line + self._buf.count("\n", 0, self._pos if pos is None else pos)
        return DataError(f"{self.path}:{line}: {message} (a .json input must be one valid JSON list; "
                         "--skip_bad_lines cannot skip inside it)")

    def _fill(self, handle) -> bool:
        """Drop consumed text and read more; False at end of file."""
        if self._eof:
            return False
        self._line += self._buf.count("\n", 0, self._pos)
        self._buf, self._pos = self._buf[self._pos:], 0
        data = handle.read(self._chunk_bytes)
        try:
            self._buf += self._utf8.decode(data, final=not data)
        except UnicodeDecodeError as err:
            raise self._utf8_error(self._bytes_read + err.start) from None
        self._bytes_read += len(data)
        self._eof = not data
        return True

    def _utf8_error(self, byte_offset):
        with open(self.path, "rb") as handle:
            line = handle.read(byte_offset).count(b"\n") + 1
        return DataError(f"{self.path}:{line}: invalid UTF-8 (byte {byte_offset})")

    def _skip_space(self, handle) -> str:
        """The next non-space character ('' at end of file), without consuming it."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._buf) or not self._fill(handle):
                return self._buf[self._pos:self._pos + 1]

    def _expect(self, handle, allowed: str) -> str:
        char = self._skip_space(handle)
        if not char or char not in allowed:
            raise self._error(f"expected {' or '.join(repr(c) for c in allowed)}, found {char or 'end of file'!r}")
        self._pos += 1
        return char

    def _decode_value(self, handle):
        self._skip_space(handle)
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                if self._fill(handle):  # maybe the value is just cut by the buffer end
                    continue
                raise self._error(f"malformed JSON: {err.msg}", err.pos) from None
            # a number or literal cut by the buffer end decodes "successfully": make sure it is complete
            if end == len(self._buf) and self._fill(handle):
                continue
            line = self._line + self._buf.count("\n", 0, self._pos)
            self._pos = end
            return line, value

    def chunks(self):
        items, last_bytes = [], 0
        with open(self.path, "rb") as handle:
            self._expect(handle, "[")
            if self._skip_space(handle) == "]":
                self._pos += 1
            else:
                while True:
                    items.append(self._decode_value(handle))
                    if self._bytes_read - last_bytes >= self._chunk_bytes or len(items) >= CHUNK_ITEMS:
                        yield items, self._bytes_read - last_bytes
                        items, last_bytes = [], self._bytes_read
                    if self._expect(handle, ",]") == "]":
                        break
            if self._skip_space(handle):
                raise self._error("extra data after the JSON list")
        yield items, self._bytes_read - last_bytes


def read_chunks(path, fmt, chunk_bytes=None):
    """(items, input bytes) chunks of about `chunk_bytes` (default CHUNK_BYTES) of a file: items are (line number,
    raw line bytes) for txt and jsonl, (line number, parsed record) for a JSON list."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    return _JsonListReader(path, chunk_bytes).chunks() if fmt == "json" else _line_chunks(path, chunk_bytes)


# ---- encoding (runs in worker processes when workers > 1)

_worker_tokenizer = None


def _load_worker_tokenizer(load, source):
    global _worker_tokenizer
    _worker_tokenizer = load(source)


def _encode_in_worker(encode, items, *args):
    return encode(_worker_tokenizer, items, *args)


def _record_text(record, key):
    if isinstance(record, dict) and isinstance(record.get(key), str):
        return record[key], None
    found = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    return None, f"no string field {key!r} (found: {found}); choose one with --text_key, or use --whole_record"


def _sample_text(payload, opts: EncodeOptions):
    """(text or None, reason if bad). Text None with no reason means blank."""
    if opts.fmt == "json":
        return (json.dumps(payload), None) if opts.whole_record else _record_text(payload, opts.text_key)
    try:
        line = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 (byte {err.start} of the line)"
    if opts.fmt == "txt" or not line.strip():
        return line.strip() or None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} (column {err.colno})"
    return (line, None) if opts.whole_record else _record_text(record, opts.text_key)  # whole: the raw line, "\n" too


def encode_chunk(sp, items, opts: EncodeOptions):
    """Encode one chunk: (bin bytes, line byte lengths, token counts, blank count, [(line, reason)] of bad items)."""
    texts, bad, blank = [], [], 0
    for line_no, payload in items:
        text, reason = _sample_text(payload, opts)
        if reason:
            bad.append((line_no, reason))
        elif text:
            texts.append(text)
        else:
            blank += 1
    ids = sp.encode(texts, add_bos=opts.add_bos, add_eos=opts.add_eos, num_threads=1)
    return (*format_bin_lines(ids), blank, bad)


class InOrderPool:
    """Apply `encode(tokenizer, items, *args)` to chunks in `workers` processes, each holding the tokenizer
    `load(source)` (module-level functions: they travel to the workers by name), yielding results in input order with
    a bounded number of chunks in flight (Pool.imap would read the whole input ahead).

    `loaded`: that tokenizer, when the caller holds it already. Workers started by fork then inherit it instead of
    loading their own: a fast tokenizer takes most of a second to load, time in which no chunk is encoded, which one
    worker in the main process never pays. They run with the Rust tokenizer's own threads off: one process per core
    is the parallelism, and more threads than cores only contend."""

    def __init__(self, workers, encode, load, source, loaded=None):
        global _worker_tokenizer
        if loaded is not None and "fork" in multiprocessing.get_all_start_methods():
            _worker_tokenizer = loaded  # kept until close(): the pool forks a replacement if a worker dies
            with _tokenizer_threads_off():
                self._pool = multiprocessing.get_context("fork").Pool(workers)
        else:
            with _tokenizer_threads_off():
                self._pool = multiprocessing.get_context().Pool(workers, _load_worker_tokenizer, (load, source))
        self._encode = encode
        self._depth = 2 * workers

    def map(self, chunks, *args):
        pending = deque()
        for items, size in chunks:
            pending.append((self._pool.apply_async(_encode_in_worker, (self._encode, items, *args)), size))
            if len(pending) > self._depth:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done

    def close(self):
        global _worker_tokenizer
        self._pool.terminate()
        self._pool.join()
        _worker_tokenizer = None


@contextlib.contextmanager
def _tokenizer_threads_off():
    """TOKENIZERS_PARALLELISM=false for the processes started inside (unless the user set it), the main process's
    setting left as it was."""
    if PARALLELISM_ENV in os.environ:
        yield
        return
    os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        del os.environ[PARALLELISM_ENV]


def tokenize_file(input_path, bin_path, tokenizer_path=None, *, text_key="text", whole_record=False, add_bos=False,
                  add_eos=False, workers=1, skip_bad_lines=False, mode="create", progress=True) -> TokenizeStats:
    """Tokenize a txt/jsonl/json file into `bin_path` and `bin_path.meta`. Raises DataError on bad input.

    A folder (save_to_disk, or data files) or a .parquet file is a Hugging Face dataset: see
    tokenize_hf_dataset (the text of column `text_key`)."""
    input_path = Path(input_path)
    if input_path.is_dir() or input_path.suffix.lower() == ".parquet":
        if whole_record or skip_bad_lines:
            raise DataError(f"{input_path} is a Hugging Face dataset: it has columns, not lines; choose the text "
                            "column with --text_key (--whole_record and --skip_bad_lines read json/jsonl files)")
        return tokenize_hf_dataset(input_path, bin_path, tokenizer_path, text_key=text_key, add_bos=add_bos,
                                   add_eos=add_eos, workers=workers, mode=mode, progress=progress)
    opts = EncodeOptions(input_format(input_path), text_key, whole_record, add_bos, add_eos)
    if not input_path.is_file():
        raise DataError(f"input file {input_path} not found")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, not {workers}")
    tokenizer_path = find_tokenizer(tokenizer_path)
    stats = TokenizeStats()
    start = time.perf_counter()
    pool = InOrderPool(workers, encode_chunk, load_tokenizer, str(tokenizer_path)) if workers > 1 else None
    try:
        with BinWriter(bin_path, mode) as writer, tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True,
                                                       unit_divisor=1024, desc=input_path.name,
                                                       disable=not progress) as bar:
            chunks = read_chunks(input_path, opts.fmt)
            if pool:
                results = pool.map(chunks, opts)
            else:
                sp = load_tokenizer(tokenizer_path)
                results = ((encode_chunk(sp, items, opts), size) for items, size in chunks)
            for (blob, line_bytes, token_counts, blank, bad), size in results:
                if bad and not skip_bad_lines:
                    line_no, reason = bad[0]
                    raise DataError(f"{input_path}:{line_no}: {reason} (--skip_bad_lines skips such lines)")
                writer.write_formatted(blob, line_bytes, token_counts)
                stats.samples += len(line_bytes)
                stats.tokens += int(token_counts.sum())
                stats.blank += blank
                stats.bad += len(bad)
                stats.input_bytes += size
                bar.update(size)
            if not stats.samples:
                raise DataError(f"{input_path} has no samples ({stats.blank} blank, {stats.bad} bad lines); "
                                "nothing was written")
            writer.commit()
    finally:
        if pool:
            pool.close()
    stats.seconds = time.perf_counter() - start
    return stats


def tokenize_hf_dataset(input_path, bin_path, tokenizer_path=None, *, text_key="text", add_bos=False, add_eos=False,
                        workers=1, mode="create", progress=True) -> TokenizeStats:
    """tools/tokenizer.py for a local Hugging Face dataset (save_to_disk folder, or parquet/jsonl/... files): the same
    bin/meta a jsonl file with the same records gives."""
    dataset = open_hf_dataset(input_path)
    encoder = TextEncoder(tokenizer_path, text_key, add_bos, add_eos, where=str(input_path), threads=workers)
    encoder.check_columns(dataset.column_names)
    stats = TokenizeStats(input_bytes=int(dataset.data.nbytes))
    start = time.perf_counter()
    with BinWriter(bin_path, mode) as writer, tqdm(total=len(dataset), unit="rows", desc=Path(input_path).name,
                                                   disable=not progress) as bar:
        for batch in dataset.iter(batch_size=ENCODE_BATCH):
            encoded = encoder.encode(batch)
            kept = [ids for ids in encoded if ids is not None]
            writer.write(kept)
            stats.samples += len(kept)
            stats.tokens += sum(map(len, kept))
            stats.blank += len(encoded) - len(kept)
            bar.update(len(encoded))
        if not stats.samples:
            raise DataError(f"{input_path} has no text in column {text_key!r} ({stats.blank} empty rows); nothing "
                            "was written")
        writer.commit()
    stats.seconds = time.perf_counter() - start
    return stats
