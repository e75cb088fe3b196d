"""Work units (docs/design.md §2.5, docs/token-files.md *Work units*): unit k becomes shard k. Each input
file is cut on its own (no unit spans two files), so the plan of a run is a short list per file:

- a plain (uncompressed) FASTA file is cut into **byte ranges** of `unit_bytes` bytes (from the
  settings and the file's first MiB, `_unit_bytes`): unit j owns the bases whose bytes lie in
  [c_j, c_{j+1}), c_j being the first valid cut at or after byte j * unit_bytes (a header's '>', or a
  base that is not its record's first: a header always stays with its record's first base). A unit
  finds its cut by a seek and a short scan around it (`_cut`), so planning reads O(1) bytes per file
  and a rank reads only its units' bytes (plus a few halo bases around them);
- a compressed or FASTQ file (no seeking to a byte) is cut greedily, as format 3 cut all inputs, into
  units of at most `shard_bases` bases and `shard_records` pieces; planning it reads it (rank 0).

A unit only knows what lies in its range: its pieces carry shard-local index values (record numbers
from 0 in the unit, -1 for a piece continuing a record of an earlier unit, whose name and start are
not known there; every start 0, every record length the piece's own), which the run's final manifest
completes (token_files.link_shards). The packing coordinates (`Unit.starts`, `Unit.record_lengths`)
are the piece's place in what the unit holds of its record, halo included.

A unit is columnar (numpy arrays and one byte buffer, no object per record), so its memory is a few
bytes per piece plus its bases, bounded by the unit's size whatever the corpus holds.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from vqdna.data.fasta import (
    DEFAULT_BLOCK_SIZE,
    _TABLE,
    _WHITESPACE,
    FastaFormatError,
    FastaRecord,
    _Cursor,
    _FastaParser,
    fasta_record_lengths,
    read_fasta,
)
from vqdna.data.alphabet import INVALID
from vqdna.streaming.token_files import Pieces

__all__ = ["FilePlan", "Plan", "Unit", "UnitStart", "plan_units", "planned_units", "work_units"]

_FLUSH = 4096  # records gathered in Python lists before they are joined into arrays
SAMPLE_BYTES = 1 << 20  # a plain file's first bytes, from which its unit size is derived
MAX_HEADER_BYTES = 1 << 20  # a longer header line is refused in plain FASTA (see _back)
_INVALID = bytes([INVALID])


@dataclass
class Unit:
    """Work unit `index` (shard `index`): its pieces in input order (columnar, with the shard-local
    index values its .idx records), and the base ids around each piece (its bases and up to `margin`
    more on each side, for the windows' halo). In packing coordinates (starts, record_lengths int64
    [pieces]: the piece is bases [starts[j], starts[j] + length) of a record of record_lengths[j]
    bases, as far as the unit holds it), bases [seq_starts[j], seq_starts[j] + n) of piece j's record
    are seq[seq_offsets[j] :][:n] (seq uint8; seq_starts, seq_offsets int64 [pieces]). starts and
    record_lengths default to the pieces' own."""

    index: int
    pieces: Pieces
    seq: np.ndarray
    seq_starts: np.ndarray
    seq_offsets: np.ndarray
    starts: Optional[np.ndarray] = None
    record_lengths: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.starts is None:
            self.starts = self.pieces.starts
        if self.record_lengths is None:
            self.record_lengths = self.pieces.record_lengths

    @property
    def bases(self) -> int:
        return int(self.pieces.lengths.sum())


class _UnitBuilder:
    """Collects a unit's pieces: per record a few list appends; every _FLUSH records the lists are
    joined into arrays, so no Python object per record outlives a few thousand records."""

    def __init__(self, margin: int):
        self.margin = margin
        self.bases = self.count = 0
        self._rows: list[tuple] = []  # per piece: local ordinal, start, length, record length, seq start
        self._names: list[bytes] = []
        self._seqs: list[np.ndarray] = []
        self._chunks: list[tuple] = []

    def add(self, ordinal: int, name: bytes, start: int, length: int, record: np.ndarray) -> None:
        """Piece `ordinal` (shard-local: -1 continues a record of an earlier unit) = bases
        [start, start + length) of `record` (what the unit holds of it, halo included)."""
        n = len(record)
        lo, hi = max(0, start - self.margin), min(n, start + length + self.margin)
        self._rows.append((ordinal, start, length, n, lo))
        self._names.append(name)
        self._seqs.append(record if hi - lo == n else record[lo:hi])
        self.bases += length
        self.count += 1
        if len(self._rows) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            cols = np.array(self._rows, dtype=np.int64).T
            name_lengths = np.fromiter(map(len, self._names), dtype=np.int64, count=len(self._names))
            self._chunks.append((cols, name_lengths, b"".join(self._names), _join(self._seqs)))
            self._rows, self._names, self._seqs = [], [], []

    def build(self, index: int) -> Unit:
        self._flush()
        chunks = self._chunks
        if not chunks:  # a byte range inside one header line (shard_bases below a header's size)
            empty = np.zeros(0, np.int64)
            return Unit(index, Pieces(empty, b"", np.zeros(1, np.int64), empty, empty, empty), np.zeros(0, np.uint8), empty, empty)
        cols = [np.concatenate([c[0][k] for c in chunks]) for k in range(5)]
        name_offsets = np.zeros(self.count + 1, dtype=np.int64)
        np.cumsum(np.concatenate([c[1] for c in chunks]), out=name_offsets[1:])
        seq = _join([c[3] for c in chunks])
        kept = np.minimum(cols[3], cols[1] + cols[2] + self.margin) - cols[4]  # bases kept per piece
        seq_offsets = np.zeros(self.count, dtype=np.int64)
        np.cumsum(kept[:-1], out=seq_offsets[1:])
        # The shard records local values only: every start 0, every record length the piece's own
        # (whole records are; the manifest completes the split ones: token_files.link_shards).
        lengths = cols[2]
        pieces = Pieces(cols[0], b"".join(c[2] for c in chunks), name_offsets, np.zeros_like(lengths), lengths, lengths)
        return Unit(index, pieces, seq, cols[4], seq_offsets, cols[1], cols[3])


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """One uint8 array (no copy for a single array: a long record's bases are not duplicated)."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)


def _check_limits(shard_bases: int, shard_records: int) -> None:
    if shard_bases < 1 or shard_records < 1:
        raise ValueError(f"shard_bases and shard_records must be >= 1, got {shard_bases}, {shard_records}")


# --- plain FASTA: byte-range units -------------------------------------------------------------

def _unit_bytes(path: str, shard_bases: int, shard_records: int) -> int:
    """Bytes per unit of `path` if it is plain FASTA (its first non-blank byte a '>' at a line start),
    else 0 (compressed, FASTQ, or malformed: cut greedily, and read_fasta reports the error). From
    the first SAMPLE_BYTES only: shard_bases, lowered to shard_records times the sample's mean bytes
    per record (so a unit of short records holds about shard_records of them)."""
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
    first = sample.lstrip(_WHITESPACE)
    blank = sample[: len(sample) - len(first)]
    if not first.startswith(b">") or not (blank == b"" or blank.endswith(b"\n")):
        return 0
    records = sample.count(b"\n>") + (sample[:1] == b">")
    return max(1, min(shard_bases, shard_records * len(sample) // records))


def _back(f, p: int, need: int) -> tuple[bool, bytes]:
    """What precedes byte p (> 0) of a plain FASTA file: (whether p lies inside a header line, the last
    `need` (>= 1) non-whitespace bytes of p's record before p: fewer when it has fewer, none in a header).
    Reads back from p in growing blocks until the start of the line holding them is in sight; a line
    whose start lies more than MAX_HEADER_BYTES back is sequence (no header is that long: _byte_unit
    refuses one that crosses a unit's end), so a single-line genome costs a bounded read."""
    size = 1 << 12
    while True:
        lo = max(0, p - size)
        f.seek(lo)
        chunk = f.read(p - lo)
        tail: list[bytes] = []
        count, end, first = 0, len(chunk), True
        while True:
            nl = chunk.rfind(b"\n", 0, end)
            if nl < 0 and lo > 0 and end < MAX_HEADER_BYTES:
                break  # the line starts before the block: read further back
            start = nl + 1  # 0 when the line starts at the file's start or is longer than any header
            if (nl >= 0 or lo == 0) and chunk.startswith(b">", start):
                return first, b"".join(reversed(tail))[-need:]  # nothing yet when p is in this header
            bases = chunk[start:end].translate(None, _WHITESPACE)
            tail.append(bases)
            count += len(bases)
            if count >= need or (nl < 0 and lo == 0):  # enough, or blanks before the first header
                return False, b"".join(reversed(tail))[-need:]
            if nl < 0:
                break  # a long line with fewer than `need` bases in sight: read further back
            end, first = nl, False
        size <<= 4


def _cut(f, size: int, a: int, need: int) -> tuple[int, bool, bytes]:
    """The first valid cut at or after byte a (0 < a < size) of a plain FASTA file: a header's '>', or a
    base that is not its record's first. Returns (its offset, whether a record continues across it, and
    then the last `need` non-whitespace bytes of that record before it); (size, False, b"") if none."""
    in_header, tail = _back(f, a, max(need, 1))
    f.seek(a - 1)
    prev_nl = f.read(1) == b"\n"
    pos, block = a, 1 << 12  # the cut is usually a few bytes on: small reads, growing if not
    while pos < size:
        chunk = f.read(block)
        block = min(block << 2, 1 << 20)
        if not chunk:
            break
        i = 0
        if in_header:
            nl = chunk.find(b"\n")
            if nl < 0:
                pos, prev_nl = pos + len(chunk), False
                continue
            in_header, i, tail = False, nl + 1, b""
        while True:
            j = len(chunk) - len(chunk[i:].lstrip(_WHITESPACE))  # the next non-whitespace byte
            if j == len(chunk):
                break
            if chunk[j] == 62 and (chunk[j - 1] == 10 if j else prev_nl):  # a '>' at a line start
                return pos + j, False, b""
            if tail:
                return pos + j, True, tail[-need:] if need else b""
            tail, i = chunk[j : j + 1], j + 1  # the record's first base: never a cut
        pos, prev_nl = pos + len(chunk), chunk.endswith(b"\n")
    return size, False, b""


def _bases_after(f, c: int, size: int, need: int) -> bytes:
    """Base ids (bytes) of the first `need` bases from byte c on of the record going on there."""
    out, count, pos, prev_nl = [], 0, c, False
    while count < need and pos < size:
        f.seek(pos)
        chunk = f.read(1 << 12)
        stop = 0 if prev_nl and chunk.startswith(b">") else chunk.find(b"\n>") + 1  # the next header
        ids = (chunk[:stop] if stop else chunk).translate(_TABLE, _WHITESPACE)
        out.append(ids)
        count += len(ids)
        if stop:
            break
        pos, prev_nl = pos + len(chunk), chunk.endswith(b"\n")
    return b"".join(out)[:need]


def _malformed(path: str) -> FastaFormatError:
    """The error read_fasta reports for `path` (error path only: reads the file from its start), for
    a bad byte a unit meets outside the records whose headers it read."""
    try:
        for _ in read_fasta(path):
            pass
    except FastaFormatError as exc:
        return exc
    return FastaFormatError(f"{path}: malformed FASTA")


def _byte_unit(path: str, size: int, unit_bytes: int, j: int, margin: int, index: int) -> Unit:
    """Unit j (numbered `index`) of a plain FASTA file of `size` bytes cut in ranges of unit_bytes: the
    bases in [c_j, c_j+1) (see _cut) plus `margin` bases of halo each side. Reads those bytes and a few
    around them."""
    a0, a1 = j * unit_bytes, min((j + 1) * unit_bytes, size)
    cursor = _Cursor(path)
    with open(path, "rb") as f:
        c0, cont, before = _cut(f, size, a0, margin) if j else (0, False, b"")
        c1, cont_last, _ = _cut(f, size, a1, 0) if a1 < size else (size, False, b"")
        f.seek(c0)
        data = f.read(max(0, c1 - c0))
        after = _bases_after(f, c1, size, margin) if cont_last and margin else b""
    before = before.translate(_TABLE)
    if _INVALID in before or _INVALID in after:
        raise _malformed(path)
    last_head = data.rfind(b"\n>") + 1 or (0 if data.startswith(b">") else -1)
    if last_head >= 0 and c1 < size:  # a header line crossing the next unit's start must be short (_back)
        line_end = data.find(b"\n", last_head)
        line_end = len(data) if line_end < 0 else line_end
        if c0 + line_end >= a1 and line_end - last_head > MAX_HEADER_BYTES:
            raise cursor.error(f"a header line longer than {MAX_HEADER_BYTES} bytes (not supported in plain FASTA)",
                               cursor.position(c0 + last_head)[0], record=None)
    unit = _UnitBuilder(margin)
    h = 0
    if cont:  # the bases before the first header continue a record of an earlier unit
        h = data.find(b"\n>") + 1 or len(data)
        ids = data[:h].translate(_TABLE, _WHITESPACE)
        if _INVALID in ids:
            raise _malformed(path)
        tail = after if h == len(data) else b""
        unit.add(-1, b"", len(before), len(ids), np.frombuffer(before + ids + tail, np.uint8))
    parser = _FastaParser(cursor)
    parser.offset = c0 + h
    local, held = 0, None
    blocks = (data[k : k + DEFAULT_BLOCK_SIZE] for k in range(h, len(data), DEFAULT_BLOCK_SIZE))  # read_fasta's steps
    for rec in parser.parse(blocks):
        if held is not None:
            unit.add(local, held.name.encode("utf-8"), 0, len(held.ids), held.ids)
            local += 1
        held = rec
    if held is not None:  # the last record: it may continue in the next unit (its halo follows it)
        record = np.concatenate([held.ids, np.frombuffer(after, np.uint8)]) if after and cont_last else held.ids
        unit.add(local, held.name.encode("utf-8"), 0, len(held.ids), record)
    return unit.build(index)


# --- compressed and FASTQ inputs: the greedy cut ----------------------------------------------

def _file_records(path: str, offset: int = 0, skip: int = 0) -> Iterator[FastaRecord]:
    """The records of one input in order, from the record at byte `offset` (FASTA), or (offset -1:
    FASTQ, not seekable) from its record number `skip`."""
    for r, rec in enumerate(read_fasta(path, start=max(offset, 0))):
        if offset >= 0 or r >= skip:
            yield rec


def _cut_greedy(records, shard_bases: int, shard_records: int, margin: int, index: int = 0, first_start: int = 0) -> Iterator[Unit]:
    """The greedy cut of one input's `records` into units of at most shard_bases bases and shard_records
    pieces, numbering units from `index`; the first record is taken from base `first_start` on."""
    unit = _UnitBuilder(margin)
    count = bases = local = 0  # of the unit being cut
    for rec in records:
        n, start = len(rec.ids), first_start
        first_start = 0
        name = rec.name.encode("utf-8")
        while True:
            take = min(n - start, shard_bases - bases)
            if start:
                unit.add(-1, b"", start, take, rec.ids)
            else:
                unit.add(local, name, start, take, rec.ids)
                local += 1
            start += take
            bases, count = bases + take, count + 1
            if bases >= shard_bases or count >= shard_records:
                yield unit.build(index)
                unit = _UnitBuilder(margin)
                index, bases, count, local = index + 1, 0, 0, 0
            if start >= n:
                break
    if count:
        yield unit.build(index)


def work_units(paths: Sequence[str], shard_bases: int, shard_records: int, margin: int = 0) -> Iterator[Unit]:
    """The deterministic work units of the inputs (see the module docstring), streamed in order; each
    keeps `margin` bases of context on each side of its pieces (the encoder's halo)."""
    _check_limits(shard_bases, shard_records)
    index = 0
    for path in paths:
        unit_bytes = _unit_bytes(path, shard_bases, shard_records)
        if unit_bytes:
            size = os.path.getsize(path)
            for j in range(-(-size // unit_bytes)):
                yield _byte_unit(path, size, unit_bytes, j, margin, index)
                index += 1
        else:
            for unit in _cut_greedy(_file_records(path), shard_bases, shard_records, margin, index):
                yield unit
                index = unit.index + 1


@dataclass(frozen=True)
class UnitStart:
    """Where a greedy unit of an input starts: record `ordinal` (0-based in its input), which starts at
    byte `offset` (FASTA; -1 for FASTQ, which is read from its start to record number `number`),
    from base `start` of that record."""

    file: int
    offset: int
    number: int
    ordinal: int
    start: int


@dataclass(frozen=True)
class FilePlan:
    """One input's units: unit_bytes > 0: byte ranges of a plain FASTA file of `size` bytes; else the
    greedy units starting at `starts`."""

    size: int
    unit_bytes: int = 0
    starts: tuple = ()

    @property
    def units(self) -> int:
        return -(-self.size // self.unit_bytes) if self.unit_bytes else len(self.starts)


@dataclass(frozen=True)
class Plan:
    """The units of a run, per input (what rank 0 broadcasts): len() is the unit count."""

    files: tuple

    def __post_init__(self) -> None:
        firsts = np.cumsum([0] + [f.units for f in self.files]).tolist()  # each input's first unit
        object.__setattr__(self, "_firsts", firsts)

    def __len__(self) -> int:
        return self._firsts[-1]

    def locate(self, k: int) -> tuple[int, int]:
        """(input, unit number within it) of unit k (0 <= k < len)."""
        if not 0 <= k < len(self):
            raise IndexError(f"unit {k} out of range ({len(self)} units)")
        f = bisect_right(self._firsts, k) - 1
        return f, k - self._firsts[f]


def plan_units(paths: Sequence[str], shard_bases: int, shard_records: int) -> Plan:
    """The plan work_units follows, without cutting: a plain FASTA input costs its size and first
    SAMPLE_BYTES (O(1) per file); a compressed FASTA file is scanned without decoding
    (fasta_record_lengths: vectorised, no Python per record) and a FASTQ file is read, for its greedy
    units' starts. Memory: a few dozen bytes per greedy unit and one block's arrays."""
    _check_limits(shard_bases, shard_records)
    files = []
    for f, path in enumerate(paths):
        size = os.path.getsize(path)
        unit_bytes = _unit_bytes(path, shard_bases, shard_records)
        if unit_bytes:
            files.append(FilePlan(size, unit_bytes))
            continue
        plan = _Planner(shard_bases, shard_records)
        number = 0
        for offsets, lengths in fasta_record_lengths(path) or _read_lengths(path):
            plan.add(f, number, offsets, lengths)
            number += len(lengths)
        files.append(FilePlan(size, 0, tuple(plan.starts)))
    return Plan(tuple(files))


def _read_lengths(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """fasta_record_lengths's batches from reading the records (FASTQ: offsets -1; a malformed file
    raises read_fasta's FastaFormatError)."""
    offsets, lengths = [], []
    for rec in read_fasta(path):
        offsets.append(rec.offset)
        lengths.append(len(rec.ids))
        if len(offsets) >= _FLUSH:
            yield np.array(offsets, np.int64), np.array(lengths, np.int64)
            offsets, lengths = [], []
    if offsets:
        yield np.array(offsets, np.int64), np.array(lengths, np.int64)


class _Planner:
    """The greedy cut of `_cut_greedy` over batches of record lengths: Python loops once per unit (a
    searchsorted over the batch's cumulative bases finds where the unit ends), not per record."""

    def __init__(self, shard_bases: int, shard_records: int):
        self.shard_bases, self.shard_records = shard_bases, shard_records
        self.starts: list[UnitStart] = []
        self.bases = self.count = self.ordinal = 0  # the unit being cut; records before this batch

    def add(self, file: int, number: int, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Records number, number + 1, ... of input `file` (offsets, base counts: int64 [records])."""
        n = len(lengths)
        cum = np.cumsum(lengths)
        before = cum - lengths
        i, start = 0, 0  # the next piece: record i of the batch from base `start`
        while i < n:
            if self.count == 0:
                self.starts.append(UnitStart(file, int(offsets[i]), number + i, self.ordinal + i, start))
            end = int(before[i]) + start + self.shard_bases - self.bases  # cumulative bases that fill the unit
            full = int(np.searchsorted(cum, end, side="left"))  # the record that fills it
            last = i + self.shard_records - self.count - 1  # the record that reaches the piece limit
            if min(full, last) >= n:  # the batch ends inside the unit
                self.bases += int(cum[-1]) - int(before[i]) - start
                self.count += n - i
                break
            self.bases = self.count = 0
            if full <= last and cum[full] > end:  # the unit ends inside record `full`: it goes on in the next
                i, start = full, int(lengths[full] - (cum[full] - end))
            else:
                i, start = min(full, last) + 1, 0
        self.ordinal += n


def planned_units(paths: Sequence[str], plan: Plan, wanted: Sequence[int], shard_bases: int,
                  shard_records: int, margin: int = 0) -> Iterator[Unit]:
    """Work units `wanted` (increasing indices) of the inputs, found from `plan` (plan_units) without
    reading the inputs before them: a byte-range unit reads its range (a seek); a greedy unit starts at
    its first record (a seek in a plain file), and consecutive wanted greedy units inside one record
    (a long genome) share one reading of it."""
    _check_limits(shard_bases, shard_records)
    units: Optional[Iterator[Unit]] = None
    file, position = -1, -1  # the input `units` reads and the index of the unit it yields next
    for k in wanted:
        f, j = plan.locate(k)
        fp = plan.files[f]
        if fp.unit_bytes:
            yield _byte_unit(paths[f], fp.size, fp.unit_bytes, j, margin, k)
            continue
        s = fp.starts[j]
        if units is None or file != f or position > k or not _same_record(fp.starts[j - (k - position)], s):
            units = _cut_greedy(_file_records(paths[f], s.offset, s.number), shard_bases, shard_records, margin,
                                index=k, first_start=s.start)
            file, position = f, k
        while True:
            unit = next(units)
            position = unit.index + 1
            if unit.index == k:
                yield unit
                break


def _same_record(a: UnitStart, b: UnitStart) -> bool:
    return (a.file, a.offset, a.ordinal) == (b.file, b.offset, b.ordinal)
