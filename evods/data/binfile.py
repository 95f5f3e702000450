"""The InternEvo `.bin` + `.bin.meta` pair: atomic writing and memory-mapped reading.

`.bin`: one `{"tokens": [...]}` JSON line per sample (json.dumps default separators).
`.bin.meta`: an `.npy` file (np.save format under the exact name `X.bin.meta`) holding an int (N, 2) array of
(byte offset of line i, token count of line i). As InternEvo's tools/tokenizer.py writes them.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np

from evods.data.errors import DataError

INT32_MAX = np.iinfo(np.int32).max
_META_COPY_ROWS = 1 << 20  # rows per chunk when turning the row stream into the final meta


def meta_path(bin_path) -> Path:
    return Path(f"{bin_path}.meta")


def format_bin_lines(token_lists) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Encode samples as `.bin` lines: (bytes, byte length of each line, token count of each line).

    Same bytes as json.dumps({"tokens": ids}) + "\\n" for int ids, about 3x faster.
    """
    lines = ['{"tokens": [' + ", ".join(map(str, ids)) + "]}\n" for ids in token_lists]
    line_bytes = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))  # ASCII: chars == bytes
    token_counts = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    return "".join(lines).encode("ascii"), line_bytes, token_counts


class BinWriter:
    """Writes one bin/meta pair under temporary names; `commit()` renames them into place.

    mode: "create" refuses an existing output, "overwrite" replaces it, "append" adds samples after the existing ones
    (the existing bin is copied first, so the old pair stays valid until the commit). An interrupted run leaves either
    the old pair, or a `.bin` without its meta (which the loader rejects), never a mismatched pair.
    Meta rows are streamed to a side file, so memory does not grow with the number of samples.
    """

    MODES = ("create", "overwrite", "append")

    def __init__(self, bin_path, mode: str = "create"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.bin_path = Path(bin_path)
        self.meta_path = meta_path(bin_path)
        exists = self.bin_path.exists() or self.meta_path.exists()
        if exists and mode == "create":
            raise DataError(f"{self.bin_path} already exists: pass --overwrite to replace it or --append to add to it")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._tmp_bin = Path(f"{self.bin_path}{suffix}")
        self._tmp_rows = Path(f"{self.meta_path}.rows{suffix}")
        self._tmp_meta = Path(f"{self.meta_path}{suffix}")
        self.num_samples = 0
        self.num_tokens = 0
        self.num_bytes = 0
        self._bin_file = None
        self._rows_file = None
        try:
            if exists and mode == "append":
                self._start_from_existing()
            else:
                self._bin_file = open(self._tmp_bin, "wb")
                self._rows_file = open(self._tmp_rows, "wb")
        except BaseException:
            self.abort()
            raise

    def _start_from_existing(self):
        existing = TokenizedDataset(self.bin_path)  # validates the pair before we build on it
        shutil.copyfile(self.bin_path, self._tmp_bin)
        self._bin_file = open(self._tmp_bin, "ab")
        self._rows_file = open(self._tmp_rows, "wb")
        rows = np.stack([existing.offsets, existing.all_lengths], axis=1).astype(np.int64)
        rows.tofile(self._rows_file)
        self.num_samples = len(rows)
        self.num_bytes = existing.file_size

    def write(self, token_lists):
        self.write_formatted(*format_bin_lines(token_lists))

    def write_formatted(self, blob: bytes, line_bytes: np.ndarray, token_counts: np.ndarray):
        """Append lines already produced by `format_bin_lines` (e.g. in a worker process)."""
        if not len(line_bytes):
            return
        offsets = self.num_bytes + np.cumsum(line_bytes) - line_bytes
        np.stack([offsets, token_counts], axis=1).astype(np.int64).tofile(self._rows_file)
        self._bin_file.write(blob)
        self.num_bytes += len(blob)
        self.num_samples += len(line_bytes)
        self.num_tokens += int(token_counts.sum())

    def commit(self):
        """Write the meta and move both files into place: old meta out first, then bin, then meta."""
        self._bin_file.close()
        self._rows_file.close()
        self._write_meta()
        self.meta_path.unlink(missing_ok=True)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_meta, self.meta_path)
        self._tmp_rows.unlink()

    def _write_meta(self):
        """np.save layout (v1.0 header, C order); int32 like InternEvo unless offsets need int64."""
        rows = np.memmap(self._tmp_rows, dtype=np.int64, mode="r", shape=(self.num_samples, 2)) \
            if self.num_samples else np.zeros((0, 2), dtype=np.int64)
        dtype = np.int32 if self.num_bytes <= INT32_MAX else np.int64
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (self.num_samples, 2)}
        with open(self._tmp_meta, "wb") as meta_file:
            np.lib.format.write_array_header_1_0(meta_file, header)
            for start in range(0, self.num_samples, _META_COPY_ROWS):
                rows[start:start + _META_COPY_ROWS].astype(dtype).tofile(meta_file)
        del rows

    def abort(self):
        for handle in (self._bin_file, self._rows_file):
            if handle is not None:
                handle.close()
        for tmp in (self._tmp_bin, self._tmp_rows, self._tmp_meta):
            tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class TokenizedDataset:
    """One `.bin` file as a dataset of token arrays (InternEvo's JsonlDataset).

    Opening reads only the meta (plus the last line, for the consistency check); samples are read with pread at
    their meta offset (O(1) per sample), so the object is cheap to pickle into DataLoader workers. `min_length` drops
    samples with fewer tokens (by the meta count). Item i is an int64 array of the i-th kept sample's tokens
    (negative = masked).
    """

    def __init__(self, bin_path, type_id: int = 0, min_length: int = 0):
        self.path = Path(bin_path)
        self.type_id = type_id
        meta_file = meta_path(self.path)
        if not self.path.exists():
            raise DataError(f"{self.path} does not exist")
        if not meta_file.exists():
            raise DataError(f"{self.path} has no meta file beside it ({meta_file.name}); "
                            "re-create the pair with tools/tokenizer.py")
        try:
            meta = np.load(meta_file, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{meta_file} is not a valid .npy meta file: {err}") from None
        if meta.ndim != 2 or meta.shape[1] != 2 or not np.issubdtype(meta.dtype, np.integer):
            raise DataError(f"{meta_file} must hold an integer (N, 2) array, found {meta.dtype} {meta.shape}")
        self.offsets = meta[:, 0].astype(np.int64)
        self.all_lengths = meta[:, 1].astype(np.int64)
        self.file_size = self.path.stat().st_size
        self._ends = np.append(self.offsets[1:], self.file_size)
        self._check_consistency(meta_file)
        self._rows = np.flatnonzero(self.all_lengths >= min_length)
        self.lengths = self.all_lengths[self._rows]
        self.num_filtered = len(self.all_lengths) - len(self._rows)

    def _check_consistency(self, meta_file):
        count = len(self.offsets)
        if count == 0:
            if self.file_size:
                raise DataError(f"{meta_file} has no rows but {self.path} has {self.file_size} bytes")
            return
        if self.offsets[0] != 0 or np.any(self._ends <= self.offsets) or np.any(self.all_lengths < 0):
            raise DataError(f"{meta_file} does not match {self.path}: offsets must start at 0 and increase within "
                            f"the file ({self.file_size} bytes) and counts must be >= 0; re-create the pair")
        last = count - 1
        line = self._read_line(last)
        if not line.endswith(b"\n") or line.count(b"\n") != 1:
            raise DataError(f"{self.path} row {last} (byte {self.offsets[last]}): the last meta row does not end "
                            f"at the end of the file ({self.file_size} bytes); the bin and meta do not match")
        self._parse(last, line)

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index) -> np.ndarray:
        row = int(self._rows[index])
        return self._parse(row, self._read_line(row))

    def _read_line(self, row) -> bytes:
        # pread, not mmap: pages of a mapped file count in the process's RSS (the whole file, after an epoch of
        # shuffled reads, even with madvise), while pread leaves them to the page cache. The file is opened per read
        # so that a training set of thousands of .bin files never runs out of file descriptors.
        start = int(self.offsets[row])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, int(self._ends[row]) - start, start)
        finally:
            os.close(fd)

    def _parse(self, row, line: bytes) -> np.ndarray:
        where = f"{self.path} row {row} (byte {self.offsets[row]})"
        try:
            tokens = np.asarray(json.loads(line)["tokens"], dtype=np.int64)
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            raise DataError(f"{where}: not a {{\"tokens\": [int, ...]}} line ({err}); the bin and meta may not "
                            "match") from None
        if tokens.ndim != 1 or len(tokens) != self.all_lengths[row]:
            raise DataError(f"{where}: the meta says {self.all_lengths[row]} tokens, the line has {tokens.size}")
        return tokens
