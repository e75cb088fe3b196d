"""Work units (DESIGN 2.5): the records of all inputs, in order, cut greedily into units of at most
`shard_bases` bases and `shard_records` pieces (a long record is split into pieces across units).
Units depend only on the input, so every rank derives the same list; unit k becomes shard k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from vqdna.data.fasta import read_fasta
from vqdna.streaming.token_files import Piece

__all__ = ["Unit", "work_units"]


@dataclass
class Unit:
    """Work unit `index` (shard `index`): pieces of records in input order, and the base ids of their
    records (whole records, so windows can read their halo beyond the piece)."""

    index: int
    pieces: list[Piece]
    records: dict[int, np.ndarray]

    @property
    def bases(self) -> int:
        return sum(p.length for p in self.pieces)


def work_units(paths: Sequence[str], shard_bases: int, shard_records: int) -> Iterator[Unit]:
    """The deterministic work units of the inputs (see the module docstring), streamed."""
    if shard_bases < 1 or shard_records < 1:
        raise ValueError(f"shard_bases and shard_records must be >= 1, got {shard_bases}, {shard_records}")
    index, ordinal, bases = 0, 0, 0
    pieces: list[Piece] = []
    records: dict[int, np.ndarray] = {}
    for path in paths:
        for rec in read_fasta(path):
            n, start = len(rec.ids), 0
            while True:
                take = min(n - start, shard_bases - bases)
                pieces.append(Piece(ordinal, rec.name, start, take, n))
                records[ordinal] = rec.ids
                bases, start = bases + take, start + take
                if bases >= shard_bases or len(pieces) >= shard_records:
                    yield Unit(index, pieces, records)
                    index, bases, pieces, records = index + 1, 0, [], {}
                if start >= n:
                    break
            ordinal += 1
    if pieces:
        yield Unit(index, pieces, records)
