"""Work units (docs/design.md §2.5): the records of all inputs, in order, cut greedily into units of at most
`shard_bases` bases and `shard_records` pieces (a long record is split into pieces across units).
Units depend only on the input, so every rank derives the same list; unit k becomes shard k.

A unit is columnar (numpy arrays and one byte buffer, no object per record), so its memory is a few
bytes per piece plus its bases, bounded by the two limits whatever the corpus holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from vqdna.data.fasta import FastaRecord, fasta_record_lengths, read_fasta
from vqdna.streaming.token_files import Piece, Pieces

__all__ = ["Unit", "UnitStart", "plan_units", "planned_units", "work_units"]

_FLUSH = 4096  # records gathered in Python lists before they are joined into arrays


@dataclass
class Unit:
    """Work unit `index` (shard `index`): its pieces in input order (columnar), and the base ids
    around each piece (its bases and up to `margin` more on each side, for the windows' halo):
    bases [seq_starts[j], seq_starts[j] + n) of piece j's record are seq[seq_offsets[j] :][:n]
    (seq uint8; seq_starts, seq_offsets int64 [pieces])."""

    index: int
    pieces: Pieces
    seq: np.ndarray
    seq_starts: np.ndarray
    seq_offsets: np.ndarray

    @property
    def bases(self) -> int:
        return int(self.pieces.lengths.sum())


class _UnitBuilder:
    """Collects a unit's pieces: per record a few list appends; every _FLUSH records the lists are
    joined into arrays, so no Python object per record outlives a few thousand records."""

    def __init__(self, margin: int):
        self.margin = margin
        self.bases = self.count = 0
        self._rows: list[tuple] = []  # per piece: ordinal, start, length, record length, seq start
        self._names: list[bytes] = []
        self._seqs: list[np.ndarray] = []
        self._chunks: list[tuple] = []

    def add(self, ordinal: int, name: bytes, start: int, length: int, record: np.ndarray) -> None:
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
        cols = [np.concatenate([c[0][k] for c in chunks]) for k in range(5)]
        name_offsets = np.zeros(self.count + 1, dtype=np.int64)
        np.cumsum(np.concatenate([c[1] for c in chunks]), out=name_offsets[1:])
        seq = _join([c[3] for c in chunks])
        kept = np.minimum(cols[3], cols[1] + cols[2] + self.margin) - cols[4]  # bases kept per piece
        seq_offsets = np.zeros(self.count, dtype=np.int64)
        np.cumsum(kept[:-1], out=seq_offsets[1:])
        pieces = Pieces(cols[0], b"".join(c[2] for c in chunks), name_offsets, cols[1], cols[2], cols[3])
        return Unit(index, pieces, seq, cols[4], seq_offsets)


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """One uint8 array (no copy for a single array: a long record's bases are not duplicated)."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)


def _check_limits(shard_bases: int, shard_records: int) -> None:
    if shard_bases < 1 or shard_records < 1:
        raise ValueError(f"shard_bases and shard_records must be >= 1, got {shard_bases}, {shard_records}")


def _records(paths: Sequence[str], file: int = 0, offset: int = 0, skip: int = 0) -> Iterator[tuple[int, int, FastaRecord]]:
    """(file number, record number in that file, record) of the inputs in order, from the record at
    byte `offset` of paths[file], or (offset -1: FASTQ, not seekable) its record number `skip`."""
    for f in range(file, len(paths)):
        first = f == file
        records = read_fasta(paths[f], start=offset if first and offset > 0 else 0)
        for r, rec in enumerate(records, skip if first and offset > 0 else 0):
            if not (first and offset < 0 and r < skip):
                yield f, r, rec


def _cut(records, shard_bases: int, shard_records: int, margin: int, index: int = 0, ordinal: int = 0,
         first_start: int = 0) -> Iterator[Unit]:
    """The greedy cut (module docstring) of `records`, numbering units from `index` and records from
    `ordinal`; the first record is taken from base `first_start` on."""
    unit = _UnitBuilder(margin)
    count = bases = 0  # of the unit being cut
    for file, number, rec in records:
        n, start = len(rec.ids), first_start
        first_start = 0
        name = rec.name.encode("utf-8")
        while True:
            take = min(n - start, shard_bases - bases)
            unit.add(ordinal, name, start, take, rec.ids)
            start += take
            bases, count = bases + take, count + 1
            if bases >= shard_bases or count >= shard_records:
                yield unit.build(index)
                unit = _UnitBuilder(margin)
                index, bases, count = index + 1, 0, 0
            if start >= n:
                break
        ordinal += 1
    if count:
        yield unit.build(index)


def work_units(paths: Sequence[str], shard_bases: int, shard_records: int, margin: int = 0) -> Iterator[Unit]:
    """The deterministic work units of the inputs (see the module docstring), streamed; each keeps
    `margin` bases of context on each side of its pieces (the encoder's halo)."""
    _check_limits(shard_bases, shard_records)
    yield from _cut(_records(paths), shard_bases, shard_records, margin)


@dataclass(frozen=True)
class UnitStart:
    """Where work unit k starts: record `ordinal` (0-based over all inputs), which is record `number`
    of input `file` and starts at its byte `offset` (FASTA; -1 for FASTQ, which is read from its
    start to that record), from base `start` of that record."""

    file: int
    offset: int
    number: int
    ordinal: int
    start: int


def plan_units(paths: Sequence[str], shard_bases: int, shard_records: int) -> list[UnitStart]:
    """The start of every work unit (the plan one rank makes and broadcasts under torch.distributed):
    the same cut as work_units, from the records' offsets and base counts only. A FASTA file is scanned
    without decoding (fasta_record_lengths: vectorised per block, no Python per record); a FASTQ file
    is read. Memory: a few dozen bytes per unit and one block's arrays."""
    _check_limits(shard_bases, shard_records)
    plan = _Planner(shard_bases, shard_records)
    for f, path in enumerate(paths):
        number = 0
        for offsets, lengths in fasta_record_lengths(path) or _read_lengths(path):
            plan.add(f, number, offsets, lengths)
            number += len(lengths)
    return plan.starts


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
    """The greedy cut of `_cut` over batches of record lengths: Python loops once per unit (a
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


def planned_units(paths: Sequence[str], plan: Sequence[UnitStart], wanted: Sequence[int], shard_bases: int,
                  shard_records: int, margin: int = 0) -> Iterator[Unit]:
    """Work units `wanted` (increasing indices) of the inputs, found from `plan` (plan_units) without
    reading the inputs before them: each unit's reading starts at its first record (a seek in a plain
    file). Consecutive wanted units inside one record (a long genome) share one reading of it."""
    _check_limits(shard_bases, shard_records)
    units: Optional[Iterator[Unit]] = None
    position = -1  # the index of the unit `units` yields next
    for k in wanted:
        s = plan[k]
        if units is None or position > k or not _same_record(plan[position], s):
            units = _cut(_records(paths, s.file, s.offset, s.number), shard_bases, shard_records, margin,
                         index=k, ordinal=s.ordinal, first_start=s.start)
            position = k
        while True:
            unit = next(units)
            position = unit.index + 1
            if unit.index == k:
                yield unit
                break


def _same_record(a: UnitStart, b: UnitStart) -> bool:
    return (a.file, a.offset, a.ordinal) == (b.file, b.offset, b.ordinal)
