"""Token files (DESIGN 2.5, docs/token-files.md): a directory of shards plus one manifest.

    manifest.json        format version, tokenizer sha256 + config, inputs, levels, dtype, shards,
                         and "complete": true only once every shard is done
    shard-00000.bin      codes of the shard's pieces, one after another, each [length, n_levels]
                         row-major (levels interleaved), uint16 (every codebook <= 65536 codes) or uint32
    shard-00000.idx      Megatron MMIDIDX index (sizes, byte pointers, document index), then a vqdna
                         trailer: per piece the record ordinal, start, record length and name

A piece is a record, or a part of one when a record is longer than what one shard holds; pieces of
a record are consecutive (across shards). Nothing in a shard depends on time or machine: the same
input and tokenizer give the same bytes. A shard's index entries are held only while that shard is
written (a shard holds at most `shard_records` pieces), so memory never grows with the corpus.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "TokenDataset",
    "TokenFileError",
    "ShardWriter",
    "codes_dtype",
    "read_manifest",
    "read_shard_index",
    "shard_complete",
    "shard_name",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"

# Megatron-LM / NeMo indexed dataset header (megatron/core/datasets/indexed_dataset.py).
_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
_MMIDIDX_VERSION = 1
# Megatron dtype codes. uint32 has none: its codes are < 2**31, so the bytes read as int32 (code 4).
_MEGATRON_CODE = {"uint16": 8, "uint32": 4}
_TRAILER_MAGIC = b"VQDNAIDX"
_TRAILER_VERSION = 1


class TokenFileError(ValueError):
    """A token directory that cannot be read or continued; the message says which file and why."""


def codes_dtype(codebook_sizes: Sequence[int]) -> str:
    """"uint16" when every codebook has at most 65536 codes, else "uint32"."""
    return "uint16" if max(codebook_sizes) <= 1 << 16 else "uint32"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class Piece:
    """Bases [start, start + length) of record `ordinal` (its index over all inputs, 0-based)."""

    ordinal: int
    name: str
    start: int
    length: int
    record_length: int


class ShardWriter:
    """Writes one shard under temporary names; `close()` makes it complete (renames .bin, then .idx).

    pieces: the shard's pieces in order. `write(codes)` appends codes [m, n_levels] (any integer dtype,
    values checked against `codebook_sizes`, counted in `usage`) continuing where the last write
    stopped; close() checks that exactly sum(length) rows arrived. Until close() returns, the shard
    does not look complete.
    """

    def __init__(self, directory: str, index: int, pieces: Sequence[Piece], codebook_sizes: Sequence[int]):
        self.directory = directory
        self.name = shard_name(index)
        self.pieces = list(pieces)
        self.n_levels = len(codebook_sizes)
        self.dtype = np.dtype(codes_dtype(codebook_sizes)).newbyteorder("<")
        self._limits = np.asarray(codebook_sizes, dtype=np.int64)
        self.usage = [np.zeros(k, dtype=np.int64) for k in codebook_sizes]  # codes written, per level
        self.expected_rows = sum(p.length for p in self.pieces)
        self.rows = 0
        self.bin_path = os.path.join(directory, self.name + ".bin")
        self.idx_path = os.path.join(directory, self.name + ".idx")
        self._file = open(self.bin_path + TMP_SUFFIX, "wb")

    def write(self, codes: np.ndarray) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.n_levels:
            raise ValueError(f"{self.name}: codes must be [m, {self.n_levels}], got {codes.shape}")
        if self.rows + codes.shape[0] > self.expected_rows:
            raise ValueError(f"{self.name}: more codes than its pieces hold ({self.expected_rows} rows)")
        # The usage histogram is also the range check (one pass per level): a negative code makes
        # bincount raise, a code >= K lengthens its output.
        for level, k in enumerate(self._limits.tolist()):
            try:
                counts = np.bincount(codes[:, level], minlength=k)
            except (ValueError, TypeError):
                counts = None
            if counts is None or len(counts) > k:
                raise ValueError(f"{self.name}: a level-{level} code is outside its codebook of {k} codes")
            self.usage[level] += counts
        with _naming(self.bin_path + TMP_SUFFIX):
            self._file.write(np.ascontiguousarray(codes, dtype=self.dtype).data)  # no extra bytes copy
        self.rows += codes.shape[0]

    def close(self) -> None:
        if self.rows != self.expected_rows:
            raise ValueError(f"{self.name}: got {self.rows} rows of codes, its pieces hold {self.expected_rows}")
        with _naming(self.bin_path + TMP_SUFFIX):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        with open(self.idx_path + TMP_SUFFIX, "wb") as f:
            _write_index(f, self.pieces, self.dtype, self.n_levels)
            f.flush()
            os.fsync(f.fileno())
        # .idx last: a shard is complete exactly when both final names exist (shard_complete).
        os.replace(self.bin_path + TMP_SUFFIX, self.bin_path)
        os.replace(self.idx_path + TMP_SUFFIX, self.idx_path)
        _fsync_dir(self.directory)

    def abort(self) -> None:
        """Close without completing; the temporary file stays (a resumed run overwrites it)."""
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass  # the error that made us abort (disk full...) has already been raised


@contextlib.contextmanager
def _naming(path: str):
    """Give a file-less OSError (a failed write or flush: disk full, quota) the file's name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(f, pieces: Sequence[Piece], dtype: np.dtype, n_levels: int) -> None:
    n = len(pieces)
    lengths = np.fromiter((p.length for p in pieces), dtype=np.int64, count=n)
    sizes = lengths * n_levels  # Megatron counts elements (tokens) per sequence
    if n and sizes.max() >= 1 << 31:
        raise ValueError("a piece holds 2**31 codes or more; lower shard_bases")
    pointers = np.zeros(n, dtype="<i8")
    np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    f.write(_MMIDIDX_MAGIC)
    f.write(struct.pack("<Q", _MMIDIDX_VERSION))
    f.write(struct.pack("<B", _MEGATRON_CODE[dtype.name]))
    f.write(struct.pack("<Q", n))
    f.write(struct.pack("<Q", n + 1))
    f.write(sizes.astype("<i4").tobytes())
    f.write(pointers.tobytes())
    f.write(np.arange(n + 1, dtype="<i8").tobytes())  # one document per piece
    names = [p.name.encode("utf-8") for p in pieces]
    name_offsets = np.zeros(n + 1, dtype="<i8")
    np.cumsum([len(b) for b in names], out=name_offsets[1:])
    f.write(_TRAILER_MAGIC)
    f.write(struct.pack("<QQ", _TRAILER_VERSION, n_levels))
    f.write(np.fromiter((p.ordinal for p in pieces), dtype="<i8", count=n).tobytes())
    f.write(np.fromiter((p.start for p in pieces), dtype="<i8", count=n).tobytes())
    f.write(np.fromiter((p.record_length for p in pieces), dtype="<i8", count=n).tobytes())
    f.write(name_offsets.tobytes())
    f.write(b"".join(names))


@dataclass
class ShardIndex:
    """One shard's index, memory-mapped: per piece the length (bases), byte pointer into the .bin,
    record ordinal, start within the record, record length, and name."""

    path: str
    dtype: np.dtype
    n_levels: int
    lengths: np.ndarray
    pointers: np.ndarray
    ordinals: np.ndarray
    starts: np.ndarray
    record_lengths: np.ndarray
    _name_offsets: np.ndarray
    _names: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def name(self, i: int) -> str:
        return bytes(self._names[self._name_offsets[i] : self._name_offsets[i + 1]]).decode("utf-8")

    @property
    def rows(self) -> int:
        return int(self.lengths.sum())


def read_shard_index(path: str) -> ShardIndex:
    """Parse a shard's .idx (Megatron MMIDIDX + vqdna trailer). Raises TokenFileError naming the file."""
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"{path}: cannot read the shard index ({exc})") from exc

    def fail(why: str):
        raise TokenFileError(f"{path}: not a vqdna shard index ({why})")

    header = struct.Struct("<9sQBQQ")
    if buf.size < header.size:
        fail("file too short")
    magic, version, code, n, n_docs = header.unpack_from(buf, 0)
    if magic != _MMIDIDX_MAGIC or version != _MMIDIDX_VERSION:
        fail("bad MMIDIDX header")
    names = {v: k for k, v in _MEGATRON_CODE.items()}
    if code not in names or n_docs != n + 1:
        fail(f"unexpected dtype code {code} or document count")
    off = header.size
    need = off + n * (4 + 8) + (n + 1) * 8 + len(_TRAILER_MAGIC) + 16 + n * 24 + (n + 1) * 8
    if buf.size < need:
        fail("truncated")
    sizes = np.frombuffer(buf, "<i4", n, off)
    off += 4 * n
    pointers = np.frombuffer(buf, "<i8", n, off)
    off += 8 * n + 8 * (n + 1)
    if bytes(buf[off : off + len(_TRAILER_MAGIC)]) != _TRAILER_MAGIC:
        fail("no vqdna trailer")
    off += len(_TRAILER_MAGIC)
    trailer_version, n_levels = struct.unpack_from("<QQ", buf, off)
    off += 16
    if trailer_version != _TRAILER_VERSION or n_levels < 1:
        fail(f"trailer version {trailer_version}, levels {n_levels}")
    arrays = []
    for _ in range(3):
        arrays.append(np.frombuffer(buf, "<i8", n, off))
        off += 8 * n
    name_offsets = np.frombuffer(buf, "<i8", n + 1, off)
    off += 8 * (n + 1)
    if buf.size != off + (int(name_offsets[-1]) if n + 1 else 0):
        fail("size does not match its name table")
    if (sizes % n_levels).any():
        fail("sizes are not multiples of the level count")
    return ShardIndex(
        path, np.dtype(names[code]).newbyteorder("<"), int(n_levels),
        sizes.astype(np.int64) // n_levels, pointers, arrays[0], arrays[1], arrays[2], name_offsets, buf[off:],
    )


def shard_complete(directory: str, index: int, n_levels: int, dtype: str) -> bool:
    """True when shard `index` was finished: both final files exist, the index parses, and the .bin
    has exactly the bytes the index describes."""
    base = os.path.join(directory, shard_name(index))
    if not (os.path.exists(base + ".bin") and os.path.exists(base + ".idx")):
        return False
    try:
        idx = read_shard_index(base + ".idx")
    except TokenFileError:
        return False
    if idx.n_levels != n_levels or idx.dtype.name != dtype:
        return False
    return os.path.getsize(base + ".bin") == idx.rows * n_levels * idx.dtype.itemsize


def write_manifest(directory: str, manifest: dict) -> None:
    """Atomically replace manifest.json (sorted keys, no timestamps: same content, same bytes)."""
    path = os.path.join(directory, MANIFEST)
    with open(path + TMP_SUFFIX, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + TMP_SUFFIX, path)


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of a token directory, or None when it has none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != "vqdna-tokens":
        raise TokenFileError(f"{path}: not a vqdna token manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TokenFileError(
            f"{path}: format version {manifest.get('format_version')}, this vqdna reads version {FORMAT_VERSION}"
        )
    return manifest


class TokenDataset:
    """Read-only view of a complete token directory.

    len(ds): records, in input order. ds[i] -> (name, codes) with codes a numpy array [length, n_levels]
    (uint16/uint32) memory-mapped from the shard (a copy only for a record split across shards).
    `ds.find(name)` -> index of the first record with that name; `ds.lengths` [len(ds)] int64;
    `ds.sample_windows(count, length, rng)` -> random windows for masked-LM training.
    Refuses a directory whose manifest is not marked complete.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise TokenFileError(f"{self.directory}: no {MANIFEST}; not a vqdna token directory")
        if not manifest.get("complete"):
            raise TokenFileError(
                f"{self.directory}: token files are incomplete (the run that writes them did not finish); "
                "rerun `vqdna tokenize ... --resume` with the same arguments"
            )
        self.manifest = manifest
        self.n_levels = int(manifest["levels"])
        self.codebook_sizes = list(manifest["codebook_sizes"])
        self._shards = [read_shard_index(os.path.join(self.directory, s["name"] + ".idx")) for s in manifest["shards"]]
        self._bins: list[Optional[np.memmap]] = [None] * len(self._shards)
        counts = [len(s) for s in self._shards]
        self._shard_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ordinals = np.concatenate([s.ordinals for s in self._shards]) if self._shards else np.zeros(0, np.int64)
        n_records = int(manifest["records"])
        if ordinals.size != 0 and ((np.diff(ordinals) < 0).any() or ordinals[-1] != n_records - 1):
            raise TokenFileError(f"{self.directory}: shard indexes disagree with the manifest's record count")
        # Pieces of record r are global pieces [first[r], first[r + 1]).
        self._first = np.searchsorted(ordinals, np.arange(n_records + 1, dtype=np.int64))
        piece_lengths = np.concatenate([s.lengths for s in self._shards]) if self._shards else np.zeros(0, np.int64)
        self.lengths = np.add.reduceat(piece_lengths, self._first[:-1]) if n_records else np.zeros(0, np.int64)
        # reduceat gives the piece itself for an empty range; records always have >= 1 piece
        if (np.diff(self._first) < 1).any():
            raise TokenFileError(f"{self.directory}: a record has no piece in the shard indexes")
        self._names: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.lengths)

    # Pickled (DataLoader workers under spawn) as its directory: the memory maps are reopened, not copied.
    def __getstate__(self) -> dict:
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def _piece(self, g: int) -> tuple[ShardIndex, int, int]:
        shard = bisect_right(self._shard_first, g) - 1
        return self._shards[shard], shard, g - int(self._shard_first[shard])

    def _bin(self, shard: int) -> np.ndarray:
        if self._bins[shard] is None:
            path = self._shards[shard].path[: -len(".idx")] + ".bin"
            self._bins[shard] = np.memmap(path, dtype=self._shards[shard].dtype, mode="r") if os.path.getsize(path) else np.zeros(0, self._shards[shard].dtype)
        return self._bins[shard]

    def name(self, i: int) -> str:
        idx, _, j = self._piece(int(self._first[i]))
        return idx.name(j)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        i %= n
        parts = []
        for g in range(int(self._first[i]), int(self._first[i + 1])):
            idx, shard, j = self._piece(g)
            start = int(idx.pointers[j]) // idx.dtype.itemsize
            parts.append(self._bin(shard)[start : start + int(idx.lengths[j]) * self.n_levels].reshape(-1, self.n_levels))
        return self.name(i), parts[0] if len(parts) == 1 else np.concatenate(parts)

    def find(self, name: str) -> int:
        """Index of the first record called `name` (KeyError if none). Builds a name table once."""
        if self._names is None:
            table: dict[str, int] = {}
            for i in range(len(self)):
                table.setdefault(self.name(i), i)
            self._names = table
        try:
            return self._names[name]
        except KeyError:
            raise KeyError(f"no record named {name!r} in {self.directory}") from None

    def sample_windows(self, count: int, length: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """`count` random windows of `length` positions -> int64 [count, length, n_levels].

        Every window start inside a record is equally likely (records shorter than `length` count as
        one start); positions past the end of a short record are -1 (padding).
        """
        rng = np.random.default_rng() if rng is None else rng
        starts_per_record = np.where(self.lengths > 0, np.maximum(self.lengths - length, 0) + 1, 0)
        total = int(starts_per_record.sum())
        if total == 0:
            raise ValueError(f"{self.directory}: no bases to sample windows from")
        cum = np.cumsum(starts_per_record)
        picks = rng.integers(0, total, size=count)
        records = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[records] - starts_per_record[records])
        out = np.full((count, length, self.n_levels), -1, dtype=np.int64)
        for row, (r, s) in enumerate(zip(records.tolist(), offsets.tolist())):
            window = self[r][1][s : s + length]
            out[row, : window.shape[0]] = window
        return out
