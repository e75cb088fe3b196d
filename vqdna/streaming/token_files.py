"""Token files (docs/design.md §2.5, docs/token-files.md): a directory of shards plus one manifest. This module
owns the format: it is the only one that reads or writes manifest.json, .bin and .idx bytes
(vqdna.data.TokenDataset reads through it).

    manifest.json        format version, tokenizer sha256 + config, inputs, levels, dtype, shards,
                         and "complete": true only once every shard is done
    shard-00000.bin      codes of the shard's pieces, one after another, each [length, n_levels]
                         row-major (levels interleaved), uint16 (every codebook <= 65536 codes) or uint32
    shard-00000.idx      Megatron MMIDIDX index (sizes, byte pointers, document index), then a vqdna
                         trailer: per piece the record ordinal, start, record length and name; then
                         the .bin's size and checksum and the checksum of the .idx bytes before it
    tokenize.lock        the one-writer lock (vqdna.data.integrity); empty when no run holds it

A piece is a record, or a part of one when a record is longer than what one shard holds; pieces of
a record are consecutive (across shards). Nothing in a shard depends on time or machine: the same
input and tokenizer give the same bytes. A shard's index entries are held only while that shard is
written (a shard holds at most `shard_records` pieces), so memory never grows with the corpus.

Checks: opening a TokenDataset checks every shard's structure (the .bin size against its index, the
index's pointers against its sizes) in one vectorised pass per shard; `verify=True`, `vqdna verify`
and `vqdna tokenize --resume --verify` also recompute the checksums (`shard_problem`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vqdna.data.integrity import (
    CHECKSUM,
    DIGEST_SIZE,
    MANIFEST,
    TMP_SUFFIX,
    create_new,
    file_checksum,
    new_hasher,
    parse_entry,
    remove_leftover,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "Piece",
    "Pieces",
    "ShardIndex",
    "ShardWriter",
    "TokenFileError",
    "name_hash",
    "name_hashes",
    "codes_dtype",
    "read_manifest",
    "read_shard_index",
    "shard_complete",
    "shard_entry",
    "link_shards",
    "shard_name",
    "shard_problem",
    "open_shards",
    "record_continuations",
    "verify_directory",
    "write_manifest",
]

# 2: per-shard sizes and checksums in the manifest, .bin size and checksums in the .idx trailer.
# 3: the .idx trailer adds a name index (hashes sorted, with their pieces): find() without a scan.
# 4: shards cut per input (plain FASTA: byte ranges), .idx trailers with shard-local record numbers
#    completed by the manifest (link_shards): a unit needs nothing outside its own bytes.
# Older directories are still read (v1 without checksums, v1/v2 find() by a scan); not resumed.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

# Megatron-LM / NeMo indexed dataset header (megatron/core/datasets/indexed_dataset.py).
_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
_MMIDIDX_VERSION = 1
# Megatron dtype codes. uint32 has none: its codes are < 2**31, so the bytes read as int32 (code 4).
_MEGATRON_CODE = {"uint16": 8, "uint32": 4}
_TRAILER_MAGIC = b"VQDNAIDX"
_TRAILER_VERSION = 4  # 1: no checksums (format 1); 2: no name index (format 2); 3: global record numbers (format 3)
_CHECKS = struct.Struct(f"<Q{DIGEST_SIZE}s{DIGEST_SIZE}s")  # v2 tail: .bin size, .bin digest, .idx digest


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


@dataclass(frozen=True, eq=False)
class Pieces:
    """A shard's pieces in order, columnar (no object per piece): ordinals, starts, lengths,
    record_lengths int64 [n]; the names UTF-8, concatenated in `names`, name i being
    names[name_offsets[i] : name_offsets[i + 1]] (int64 [n + 1]). Iterating gives Piece objects."""

    ordinals: np.ndarray
    names: bytes
    name_offsets: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    record_lengths: np.ndarray

    @classmethod
    def of(cls, pieces: "Sequence[Piece] | Pieces") -> "Pieces":
        if isinstance(pieces, Pieces):
            return pieces
        pieces = list(pieces)
        names = [p.name.encode("utf-8") for p in pieces]
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in names], out=offsets[1:])
        cols = [np.fromiter((getattr(p, k) for p in pieces), np.int64, count=len(pieces)) for k in ("ordinal", "start", "length", "record_length")]
        return cls(cols[0], b"".join(names), offsets, *cols[1:])

    def __len__(self) -> int:
        return len(self.ordinals)

    def name(self, i: int) -> str:
        return self.names[self.name_offsets[i] : self.name_offsets[i + 1]].decode("utf-8")

    def __iter__(self):
        for i in range(len(self)):
            yield Piece(int(self.ordinals[i]), self.name(i), int(self.starts[i]), int(self.lengths[i]), int(self.record_lengths[i]))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Pieces):
            return NotImplemented
        return self.names == other.names and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in ("name_offsets", "ordinals", "starts", "lengths", "record_lengths")
        )


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def name_hashes(names: bytes, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of each name's UTF-8 bytes -> uint64 [n] (names[offsets[i]:offsets[i + 1]]).
    Vectorised over the names: one pass per byte position, longest names first (their prefix of the
    length-sorted order is all that is still hashing); wraps mod 2**64 like the C definition."""
    data = np.frombuffer(names, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths, starts = lengths[order], offsets[:-1][order]
    h = np.full(len(lengths), _FNV_OFFSET, dtype=np.uint64)
    longest = int(sorted_lengths[0]) if len(lengths) else 0
    for j in range(longest):
        m = int(np.searchsorted(-sorted_lengths, -j, side="left"))  # names longer than j
        h[:m] = (h[:m] ^ data[starts[:m] + j]) * _FNV_PRIME
    out = np.empty_like(h)
    out[order] = h
    return out


def name_hash(name: str) -> int:
    """name_hashes of one name."""
    raw = name.encode("utf-8")
    return int(name_hashes(raw, np.array([0, len(raw)]))[0])


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
        self.pieces = Pieces.of(pieces)
        self.n_levels = len(codebook_sizes)
        self.dtype = np.dtype(codes_dtype(codebook_sizes)).newbyteorder("<")
        self._limits = np.asarray(codebook_sizes, dtype=np.int64)
        self.usage = [np.zeros(k, dtype=np.int64) for k in codebook_sizes]  # codes written, per level
        self.expected_rows = int(self.pieces.lengths.sum())
        self.rows = 0
        self.bin_path = os.path.join(directory, self.name + ".bin")
        self.idx_path = os.path.join(directory, self.name + ".idx")
        self._hash = new_hasher()  # of the .bin bytes, as they are written (no second read)
        remove_leftover(self.bin_path + TMP_SUFFIX)  # an interrupted run's; a planted symlink stays and fails below
        self._file = create_new(self.bin_path + TMP_SUFFIX)

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
        data = np.ascontiguousarray(codes, dtype=self.dtype)
        with _naming(self.bin_path + TMP_SUFFIX):
            self._file.write(data.data)  # no extra bytes copy
        self._hash.update(data)
        self.rows += codes.shape[0]

    def close(self) -> None:
        if self.rows != self.expected_rows:
            raise ValueError(f"{self.name}: got {self.rows} rows of codes, its pieces hold {self.expected_rows}")
        with _naming(self.bin_path + TMP_SUFFIX):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        bin_size = self.rows * self.n_levels * self.dtype.itemsize
        remove_leftover(self.idx_path + TMP_SUFFIX)
        with _naming(self.idx_path + TMP_SUFFIX), create_new(self.idx_path + TMP_SUFFIX) as f:
            _write_index(f, self.pieces, self.dtype, self.n_levels, bin_size, self._hash.digest())
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


def _write_index(f, pieces: Pieces, dtype: np.dtype, n_levels: int, bin_size: int, bin_digest: bytes) -> None:
    """Write the .idx (layout: docs/token-files.md); its last bytes are the .bin's size and checksum
    and the checksum of every .idx byte before them."""
    digest = new_hasher()

    def put(data) -> None:
        digest.update(data)
        f.write(data)

    n = len(pieces)
    sizes = pieces.lengths * n_levels  # Megatron counts elements (tokens) per sequence
    if n and sizes.max() >= 1 << 31:
        raise ValueError("a piece holds 2**31 codes or more; lower shard_bases")
    pointers = np.zeros(n, dtype="<i8")
    np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    put(_MMIDIDX_MAGIC)
    put(struct.pack("<Q", _MMIDIDX_VERSION))
    put(struct.pack("<B", _MEGATRON_CODE[dtype.name]))
    put(struct.pack("<Q", n))
    put(struct.pack("<Q", n + 1))
    put(sizes.astype("<i4").tobytes())
    put(pointers.tobytes())
    put(np.arange(n + 1, dtype="<i8").tobytes())  # one document per piece
    put(_TRAILER_MAGIC)
    put(struct.pack("<QQ", _TRAILER_VERSION, n_levels))
    for column in (pieces.ordinals, pieces.starts, pieces.record_lengths, pieces.name_offsets):
        put(np.ascontiguousarray(column, dtype="<i8").data)
    put(pieces.names)
    step = 1 << 16  # names hashed a slice at a time: the temporaries stay small
    hashes = np.concatenate([np.zeros(0, np.uint64)] + [
        name_hashes(pieces.names, pieces.name_offsets[i : i + step + 1]) for i in range(0, n, step)
    ])
    order = np.argsort(hashes, kind="stable")  # equal hashes keep piece order: the first record first
    put(np.ascontiguousarray(hashes[order], dtype="<u8").data)
    put(np.ascontiguousarray(order, dtype="<i8").data)
    put(struct.pack(f"<Q{DIGEST_SIZE}s", bin_size, bin_digest))
    f.write(digest.digest())


@dataclass
class ShardIndex:
    """One shard's index, memory-mapped (nothing per piece is copied): per piece the Megatron size
    (codes, int32; `lengths`: bases), byte pointer into the .bin, record ordinal, start within the
    record, record length, and name. Trailer version 2 adds the
    .bin's size and checksum and the checksum of the index's own bytes (None in version 1).
    Trailer version 4 records shard-local values (ordinals from 0, -1 for a first piece continuing a
    record of an earlier shard, whose name is empty; starts 0; record lengths the pieces' own):
    `link` completes them with the manifest's entry, and `ordinals`, `starts`, `record_lengths` and
    `name` give the completed values (computed per access: the file's columns stay mapped)."""

    path: str
    dtype: np.dtype
    n_levels: int
    sizes: np.ndarray  # int32 [n]: codes per piece (Megatron's sizes), n_levels per base
    pointers: np.ndarray
    _ordinals: np.ndarray
    _starts: np.ndarray
    _record_lengths: np.ndarray
    _name_offsets: np.ndarray
    _names: np.ndarray
    bin_size: Optional[int] = None
    bin_checksum: Optional[str] = None
    idx_checksum: Optional[str] = None
    _body: Optional[np.ndarray] = None  # the bytes idx_checksum covers
    name_hashes: Optional[np.ndarray] = None  # uint64 [n] sorted (trailer version 3)
    name_order: Optional[np.ndarray] = None  # int64 [n]: the piece of each sorted hash
    _mapped: Optional[mmap.mmap] = None  # the file's mapping (all columns are views of it)
    trailer_version: int = _TRAILER_VERSION
    ordinal_base: int = 0  # format 4: records before this shard (the manifest's records_before)
    first_piece: Optional[tuple] = None  # format 4: (start, record length, name) of a continuing first piece
    last_record_length: Optional[int] = None  # format 4: of a last piece whose record goes on in the next shard

    def link(self, entry: dict) -> None:
        """Format 4: take the values this shard could not know from its manifest entry (link_shards)."""
        continues = len(self) > 0 and int(self._ordinals[0]) == -1
        first = entry.get("continued")
        if continues != (first is not None):
            raise TokenFileError(
                f"{self.path}: its first piece {'continues' if continues else 'does not continue'} a record "
                f"of an earlier shard, the manifest says {'it does' if first is not None else 'it does not'}"
            )
        self.ordinal_base = int(entry.get("records_before", 0))
        if first is not None:
            self.first_piece = (int(first["start"]), int(first["record_length"]), str(first["name"]))
        if entry.get("last_record_length") is not None:
            self.last_record_length = int(entry["last_record_length"])

    @property
    def ordinals(self) -> np.ndarray:
        """int64 [n]: the record ordinal (0-based over all inputs) of each piece."""
        return self._ordinals + self.ordinal_base if self.ordinal_base else self._ordinals

    def ordinal(self, i: int) -> int:
        return int(self._ordinals[i]) + self.ordinal_base

    @property
    def starts(self) -> np.ndarray:
        """int64 [n]: where each piece starts in its record (bases)."""
        if self.first_piece is None:
            return self._starts
        out = np.array(self._starts, dtype=np.int64)
        out[0] = self.first_piece[0]
        return out

    @property
    def record_lengths(self) -> np.ndarray:
        """int64 [n]: the bases of each piece's record."""
        if self.first_piece is None and self.last_record_length is None:
            return self._record_lengths
        out = np.array(self._record_lengths, dtype=np.int64)
        if self.first_piece is not None:
            out[0] = self.first_piece[1]
        if self.last_record_length is not None:
            out[-1] = self.last_record_length
        return out

    def release_pages(self) -> None:
        """Unmap the pages read so far from this process (the file stays in the page cache, the
        columns stay valid and page back in on use): after the open-time pass over every column,
        an open dataset's resident memory does not grow with its pieces."""
        if self._mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mapped.madvise(mmap.MADV_DONTNEED)

    def find(self, name: str) -> Optional[int]:
        """The first piece called `name` (None if none) by the name index: O(log n), no scan."""
        # bisect, not np.searchsorted: the column is not 8-byte aligned in the file, and numpy would
        # copy all of it to search it.
        h = np.uint64(name_hash(name))
        lo, hi = bisect_left(self.name_hashes, h), bisect_right(self.name_hashes, h)
        for j in self.name_order[lo:hi].tolist():
            if self.name(j) == name:
                return j
        return None

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: bases per piece (computed on each use: not kept with the open index)."""
        return self.sizes.astype(np.int64) // self.n_levels

    def length(self, i: int) -> int:
        """Bases of piece i."""
        return int(self.sizes[i]) // self.n_levels

    def __len__(self) -> int:
        return len(self.sizes)

    def name(self, i: int) -> str:
        if i == 0 and self.first_piece is not None:
            return self.first_piece[2]
        return bytes(self._names[self._name_offsets[i] : self._name_offsets[i + 1]]).decode("utf-8")

    @property
    def rows(self) -> int:
        return int(self.sizes.sum(dtype=np.int64)) // self.n_levels


def read_shard_index(path: str) -> ShardIndex:
    """Parse a shard's .idx (Megatron MMIDIDX + vqdna trailer). Raises TokenFileError naming the file."""
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"{path}: cannot read the shard index ({exc})") from exc
    buf = np.frombuffer(mapped, dtype=np.uint8)

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
    if trailer_version not in (1, 2, 3, _TRAILER_VERSION) or n_levels < 1:
        fail(f"trailer version {trailer_version}, levels {n_levels}")
    arrays = []
    for _ in range(3):
        arrays.append(np.frombuffer(buf, "<i8", n, off))
        off += 8 * n
    name_offsets = np.frombuffer(buf, "<i8", n + 1, off)
    off += 8 * (n + 1)
    names_end = off + int(name_offsets[-1])
    table_end = names_end + (16 * n if trailer_version >= 3 else 0)  # the name index
    tail = _CHECKS.size if trailer_version >= 2 else 0
    if name_offsets[0] != 0 or (np.diff(name_offsets) < 0).any() or buf.size != table_end + tail:
        fail("size does not match its name table")
    if (sizes < 0).any() or (sizes % n_levels).any():
        fail("sizes are negative or not multiples of the level count")
    checks: tuple = (None, None, None, None)
    if tail:
        bin_size, bin_digest, idx_digest = _CHECKS.unpack_from(buf, table_end)
        checks = (int(bin_size), bin_digest.hex(), idx_digest.hex(), buf[: table_end + 8 + DIGEST_SIZE])
    table: tuple = (None, None)
    if trailer_version >= 3:
        table = (np.frombuffer(buf, "<u8", n, names_end), np.frombuffer(buf, "<i8", n, names_end + 8 * n))
        if n and ((table[0][1:] < table[0][:-1]).any() or table[1].min() < 0 or table[1].max() >= n):
            fail("its name index is not sorted or points outside the pieces")
    return ShardIndex(
        path, np.dtype(names[code]).newbyteorder("<"), int(n_levels),
        sizes, pointers, arrays[0], arrays[1], arrays[2], name_offsets, buf[off:names_end],
        *checks, *table, mapped, int(trailer_version),
    )


def _structure_problem(idx: ShardIndex, bin_path: str, bin_size: int) -> Optional[str]:
    """What is inconsistent between a shard's index and its .bin's size (None if nothing): the
    pointers must be the running sum of the sizes, and the .bin exactly as long as they describe.
    Vectorised, no .bin byte read."""
    item = idx.dtype.itemsize
    nbytes = idx.lengths * (idx.n_levels * item)
    ends = np.cumsum(nbytes)
    wrong = np.flatnonzero(idx.pointers != ends - nbytes)
    if wrong.size:
        j = int(wrong[0])
        return f"{idx.path}: piece {j} points to byte {int(idx.pointers[j])}, the pieces before it end at byte {int(ends[j] - nbytes[j])}"
    described = int(ends[-1]) if len(idx) else 0
    if idx.bin_size is not None and idx.bin_size != described:
        return f"{idx.path}: records a .bin of {idx.bin_size} bytes, its pieces describe {described}"
    if bin_size != described:
        return f"{bin_path}: {bin_size} bytes, its index describes {described}"
    bad = np.flatnonzero((idx.starts < 0) | (idx.starts + idx.lengths > idx.record_lengths))
    if bad.size:
        return f"{idx.path}: piece {int(bad[0])} lies outside its record"
    return None


def _entry_problem(idx: ShardIndex, bin_path: str, entry: dict, checksums: bool) -> Optional[str]:
    """Compare a shard with its manifest entry (sizes always, checksums when asked); None if it matches."""
    idx_size = int(idx._body.size + DIGEST_SIZE) if idx._body is not None else os.path.getsize(idx.path)
    for path, got, key in ((bin_path, os.path.getsize(bin_path), "bin"), (idx.path, idx_size, "idx")):
        want = entry.get(key, {}).get("size")
        if want is not None and got != want:
            return f"{path}: {got} bytes, the manifest says {want}"
    if len(idx) != entry.get("pieces", len(idx)) or idx.rows != entry.get("bases", idx.rows):
        return f"{idx.path}: {len(idx)} pieces of {idx.rows} bases, the manifest says {entry.get('pieces')} of {entry.get('bases')}"
    if not checksums:
        return None
    if idx.idx_checksum is not None:
        h = new_hasher()
        h.update(idx._body)
        if h.hexdigest() != idx.idx_checksum:
            return f"{idx.path}: checksum mismatch (the index is damaged)"
    want = entry.get("idx", {}).get(CHECKSUM)
    if want is not None and file_checksum(idx.path) != want:
        return f"{idx.path}: checksum differs from the manifest's"
    if idx.bin_checksum is not None or entry.get("bin", {}).get(CHECKSUM) is not None:
        got = file_checksum(bin_path)
        for want in (idx.bin_checksum, entry.get("bin", {}).get(CHECKSUM)):
            if want is not None and got != want:
                return f"{bin_path}: checksum mismatch (the codes are damaged)"
    return None


def shard_problem(
    directory: str, index: int, n_levels: int, dtype: str, entry: Optional[dict] = None, checksums: bool = False
) -> Optional[str]:
    """None when shard `index` is whole, else what is wrong with it (naming the file): both final files
    exist, the index parses, has `n_levels` levels of `dtype`, and matches the .bin's size (O(pieces),
    vectorised); with `entry` (the manifest's) the sizes match it; with `checksums` the .bin and .idx
    checksums are recomputed and compared with the index trailer's and the entry's (reads the .bin)."""
    base = os.path.join(directory, shard_name(index))
    for path in (base + ".bin", base + ".idx"):
        if not os.path.isfile(path):
            return f"{path}: missing"
    try:
        idx = read_shard_index(base + ".idx")
    except TokenFileError as exc:
        return str(exc)
    if idx.n_levels != n_levels or idx.dtype.name != dtype:
        return f"{idx.path}: {idx.n_levels} levels of {idx.dtype.name}, the manifest says {n_levels} of {dtype}"
    problem = _structure_problem(idx, base + ".bin", os.path.getsize(base + ".bin"))
    if problem is None:
        problem = _entry_problem(idx, base + ".bin", entry or {}, checksums)
    return problem


def shard_complete(directory: str, index: int, n_levels: int, dtype: str) -> bool:
    """True when shard `index` was finished: both final files exist, the index parses, and the .bin
    has exactly the bytes the index describes (see shard_problem)."""
    return shard_problem(directory, index, n_levels, dtype) is None


def shard_entry(directory: str, index: int) -> tuple[dict, dict]:
    """(the manifest entry of a complete shard, what link_shards needs of it). The entry: name, pieces,
    bases, and per file its size and checksum (the .bin's from the index trailer, computed as the
    codes were written: no second read of the .bin). The summary, from the shard-local values:
    records starting in it, whether its first piece continues a record, the lengths of its first and
    last pieces and the last one's name."""
    base = os.path.join(directory, shard_name(index))
    idx = read_shard_index(base + ".idx")
    entry = {
        "name": shard_name(index),
        "pieces": len(idx),
        "bases": idx.rows,
        "bin": {"size": os.path.getsize(base + ".bin"), CHECKSUM: idx.bin_checksum},
        "idx": {"size": os.path.getsize(base + ".idx"), CHECKSUM: file_checksum(base + ".idx")},
    }
    n = len(idx)
    summary = {
        "pieces": n,
        "records": int((np.asarray(idx._ordinals) >= 0).sum()),
        "continues": bool(n and int(idx._ordinals[0]) == -1),
        "first_length": idx.length(0) if n else 0,
        "last_length": idx.length(n - 1) if n else 0,
        "last_name": idx.name(n - 1) if n else "",
    }
    return entry, summary


def link_shards(entries: Sequence[dict], summaries: Sequence[dict]) -> int:
    """Format 4, at the end of a run (rank 0, O(shards)): add to each manifest entry what its shard
    could not know: `records_before` (records starting in earlier shards: a piece's ordinal is that
    plus its local number), and for a record split across shards, `continued` {name, start,
    record_length} of a first piece that continues it and `last_record_length` of a last piece that
    goes on in the next shard. Returns the record count."""
    records = 0
    split = None  # the record of the last piece so far: name, bases so far, its first shard, shards continuing it

    def close():
        if split is not None and split["continued"]:
            total = split["bases"]
            split["first"]["last_record_length"] = total
            for k, entry in enumerate(split["continued"]):
                entry["continued"]["record_length"] = total
                if k + 1 < len(split["continued"]):
                    entry["last_record_length"] = total

    for entry, s in zip(entries, summaries):
        entry["records_before"] = records
        records += s["records"]
        if s["pieces"] == 0:
            continue
        if s["continues"]:
            if split is None:
                raise TokenFileError(f"{entry['name']}: its first piece continues a record no earlier shard holds")
            entry["continued"] = {"name": split["name"], "start": split["bases"]}
            split["bases"] += s["first_length"]
            split["continued"].append(entry)
        if s["records"]:  # the last piece starts a record here: the split one (if any) has ended
            close()
            split = {"name": s["last_name"], "bases": s["last_length"], "first": entry, "continued": []}
    close()
    return records


def write_manifest(directory: str, manifest: dict) -> None:
    """Atomically replace manifest.json (sorted keys, no timestamps: same content, same bytes). The
    temporary file is created new (never through a planted symlink) and removed if writing fails."""
    path = os.path.join(directory, MANIFEST)
    tmp = path + TMP_SUFFIX
    remove_leftover(tmp)
    try:
        with _naming(tmp), create_new(tmp, text=True) as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_leftover(tmp)
        raise
    os.replace(tmp, path)


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of a token directory, or None when it has none. A complete manifest's shards must
    be named shard_name(0), shard_name(1), ... in order: any other name (a path, "..") is refused."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "vqdna-tokens":
        raise TokenFileError(f"{path}: not a vqdna token manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise TokenFileError(
            f"{path}: format version {manifest.get('format_version')}, this vqdna reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        raise TokenFileError(f"{path}: 'shards' is not a list")
    for k, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        if name != shard_name(k):
            raise TokenFileError(
                f"{path}: shard {k} is named {name!r}; the format names it {shard_name(k)!r} "
                "(a plain file name in the directory: no path, no '..')"
            )
    return manifest


def verify_directory(directory: str) -> list[str]:
    """Everything wrong with a token directory, one line per problem (empty: all is well): the manifest
    (present, complete), every shard's structure, sizes and checksums (reads every byte), shard files
    the manifest does not list, and the records' order across shards. Format 1 has no checksums."""
    directory = os.fspath(directory)
    try:
        manifest = read_manifest(directory)
    except TokenFileError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{directory}: no {MANIFEST}; not a vqdna token directory"]
    if not manifest.get("complete"):
        return [f"{directory}: token files are incomplete (the run that writes them did not finish)"]
    levels, dtype = int(manifest["levels"]), manifest["dtype"]
    problems = []
    for k, entry in enumerate(manifest["shards"]):
        problem = shard_problem(directory, k, levels, dtype, entry, checksums=True)
        if problem is not None:
            problems.append(problem)
    n = len(manifest["shards"])
    for name in sorted(os.listdir(directory)):
        parsed = parse_entry(name)
        if parsed is not None and parsed[0] >= n:
            problems.append(f"{os.path.join(directory, name)}: not listed in the manifest")
    if not problems:
        try:
            record_continuations(directory, manifest, open_shards(directory, manifest))
        except TokenFileError as exc:
            problems.append(str(exc))
    return problems


def open_shards(directory: str, manifest: dict) -> list[ShardIndex]:
    """Every shard index of a complete directory, each checked against its .bin's size and its manifest
    entry (levels, dtype, pointers, sizes: one vectorised pass per index, no .bin byte read).
    Raises TokenFileError naming the shard and what is wrong."""
    n_levels = int(manifest["levels"])
    shards = []
    for entry in manifest["shards"]:
        base = os.path.join(directory, entry["name"])
        idx = read_shard_index(base + ".idx")
        if idx.n_levels != n_levels or idx.dtype.name != manifest["dtype"]:
            raise TokenFileError(
                f"{idx.path}: {idx.n_levels} levels of {idx.dtype.name}, the manifest says {n_levels} of {manifest['dtype']}"
            )
        try:
            bin_size = os.path.getsize(base + ".bin")
        except OSError as exc:
            raise TokenFileError(f"{base}.bin: cannot read the shard ({exc.strerror or exc})") from exc
        problem = _structure_problem(idx, base + ".bin", bin_size) or _entry_problem(idx, base + ".bin", entry, False)
        if problem is not None:
            raise TokenFileError(problem)
        if idx.trailer_version >= 4:
            idx.link(entry)
        idx.release_pages()
        shards.append(idx)
    return shards


def record_continuations(directory: str, manifest: dict, shards: Sequence[ShardIndex]) -> np.ndarray:
    """The record ordinal of every piece after a record's first (int64 [pieces - records], sorted):
    record r has pieces [r + c, r + c + 1 + m) of all shards' pieces, c = pieces of ordinal < r in the
    result, m = those of ordinal r. Checked one shard at a time (memory: a shard's temporaries, not
    the record count): ordinals go 0, 1, ... records - 1 in steps of 0 (a split record: that piece
    starts after base 0) or 1 (a new record, starting at base 0), and a split record's piece goes on
    where its previous piece ended, with the same record length (format 4: as the manifest completes
    them). TokenFileError naming what is wrong."""
    n_records = int(manifest["records"])
    last, pieces, continued = -1, 0, []
    end = total = 0  # where the last piece so far ends in its record, and that record's length
    for s in shards:
        ordinals = np.asarray(s.ordinals)
        if not ordinals.size:
            continue
        steps = np.diff(ordinals, prepend=last)
        if (steps < 0).any():
            raise TokenFileError(f"{directory}: shard indexes disagree with the manifest's record count")
        if (steps > 1).any():
            raise TokenFileError(f"{directory}: a record has no piece in the shard indexes")
        starts, totals = np.asarray(s.starts), np.asarray(s.record_lengths)
        if not np.array_equal(steps == 0, starts > 0):
            raise TokenFileError(f"{s.path}: a record's pieces do not start at base 0 and continue it")
        if (steps[0] == 0) != (end < total) or (steps[0] == 0 and (int(starts[0]), int(totals[0])) != (end, total)):
            raise TokenFileError(f"{s.path}: its first piece does not go on where its record's previous piece ended")
        end, total = int(starts[-1]) + s.length(len(s) - 1), int(totals[-1])
        continued.append(ordinals[steps == 0])
        last, pieces = int(ordinals[-1]), pieces + ordinals.size
        s.release_pages()  # this pass read a few columns of every index: keep one shard's resident
    if end < total:
        raise TokenFileError(f"{directory}: the last record ends before its length (a piece is missing)")
    if pieces and last != n_records - 1:
        raise TokenFileError(f"{directory}: shard indexes disagree with the manifest's record count")
    if n_records and not pieces:
        raise TokenFileError(f"{directory}: a record has no piece in the shard indexes")
    return np.concatenate(continued).astype(np.int64) if continued else np.zeros(0, np.int64)
