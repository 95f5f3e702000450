"""What a checkpoint's step marker records about its files.

The marker `{step}.step` is JSON:

    {"step": 40, "checksum": "xxh3_64",
     "files": {"deepspeed/mp_rank_00_model_states.pt": {"size": 1234, "checksum": "9f2c..."}, "context.pt": ...}}

Paths are relative to the checkpoint folder. Checksums are computed while the files are written (DigestingWriter),
so saving reads nothing back; evods.checkpoint.resume.verify checks a local copy against them. Markers of older evods
versions ({"step": N} only) carry no files: such checkpoints load unchecked.
"""
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import DamagedCheckpoint

try:  # xxh3 hashes at memory speed; sha256 (streamed) is the fallback, several times slower
    import xxhash

    CHECKSUM = "xxh3_64"
except ImportError:  # pragma: no cover - xxhash is a dependency; a marker names its algorithm either way
    xxhash = None
    CHECKSUM = "sha256"

_CHUNK = 8 << 20


def new_hasher(algorithm: str = CHECKSUM):
    if algorithm == "xxh3_64":
        if xxhash is None:
            raise ValueError("this checkpoint's checksums are xxh3_64: install xxhash (pip install xxhash)")
        return xxhash.xxh3_64()
    return hashlib.new(algorithm)


@dataclass(frozen=True)
class FileDigest:
    size: int
    checksum: str

    def to_json(self) -> dict:
        return {"size": self.size, "checksum": self.checksum}


def digest_bytes(data: bytes, algorithm: str = CHECKSUM) -> FileDigest:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return FileDigest(len(data), hasher.hexdigest())


def digest_file(path: str, algorithm: str = CHECKSUM) -> FileDigest:
    hasher, size = new_hasher(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return FileDigest(size, hasher.hexdigest())


class DigestingWriter(io.RawIOBase):
    """A write-only file that passes bytes on to `target` and digests them on the way.

    torch.save turns an OSError raised by write() into a RuntimeError ("unexpected pos ..."), so the original error
    is kept in `error` for the caller to report (a full disk, not a torch internal).
    """

    def __init__(self, target: BinaryIO):
        super().__init__()
        self.target = target
        self.hasher = new_hasher()
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            written = self.target.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.hasher.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.target.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.hasher.hexdigest())


@dataclass
class Manifest:
    """The content of a step marker."""

    step: int
    files: dict[str, FileDigest] = field(default_factory=dict)
    algorithm: str = CHECKSUM

    def to_bytes(self) -> bytes:
        return json.dumps({"step": self.step, "checksum": self.algorithm,
                           "files": {rel: digest.to_json() for rel, digest in sorted(self.files.items())}},
                          indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        """The marker's content; DamagedCheckpoint when it is empty or not a marker (a save cut short on a file
        system without atomic writes, or a file changed afterwards), so that every reader says so in one line."""
        what_to_do = "load the checkpoint before it (or re-save this one); its files cannot be checked without it"
        if not data.strip():
            raise DamagedCheckpoint(f"the step marker {where} is empty: {what_to_do}")
        try:
            content = json.loads(data)
            files = {rel: FileDigest(int(entry["size"]), str(entry["checksum"]))
                     for rel, entry in content.get("files", {}).items()}
            return cls(int(content["step"]), files, content.get("checksum", CHECKSUM))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise DamagedCheckpoint(f"the step marker {where} is not a valid marker ({reason}): {what_to_do}") \
                from None

    @property
    def verifiable(self) -> bool:
        return bool(self.files)
