"""Reading token files (docs/token-files.md): `TokenDataset`, a random-access view of a complete token
directory. The format itself (manifest, shard .bin/.idx, checks) is vqdna.streaming.token_files."""

from __future__ import annotations

import os
from bisect import bisect_right
from typing import Optional

import numpy as np

from vqdna.streaming.token_files import (
    MANIFEST,
    ShardIndex,
    TokenFileError,
    open_shards,
    read_manifest,
    record_continuations,
    verify_directory,
)

__all__ = ["TokenDataset", "TokenFileError"]


class TokenDataset:
    """Read-only view of a complete token directory.

    len(ds): records, in input order. ds[i] -> (name, codes) with codes a numpy array [length, n_levels]
    (uint16/uint32) memory-mapped from the shard (a copy only for a record split across shards).
    `ds.find(name)` -> index of the first record with that name; `ds.lengths` [len(ds)] int64;
    `ds.sample_windows(count, length, rng)` -> random windows for masked-LM training.
    Refuses a directory whose manifest is not marked complete, and (TokenFileError naming the shard)
    one whose shards do not match their indexes or the manifest: sizes, pointers, levels, dtype, in
    time proportional to the number of shards (one vectorised pass over each index, no .bin read).
    verify=True also recomputes every checksum (reads every byte; see verify_directory).
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = os.fspath(directory)
        if verify:
            problems = verify_directory(self.directory)
            if problems:
                raise TokenFileError(
                    f"{self.directory}: {len(problems)} problem(s) found by verification: " + "; ".join(problems)
                )
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
        self._shards = open_shards(self.directory, manifest)
        self._bins: list[Optional[np.memmap]] = [None] * len(self._shards)
        counts = [len(s) for s in self._shards]
        self._shard_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Memory independent of the record count: the pieces after a record's first (split records:
        # about one per shard) locate every record; lengths are read from the indexes when asked for.
        self._continued = record_continuations(self.directory, manifest, self._shards)
        self._n_records = int(manifest["records"])
        self._lengths: Optional[np.ndarray] = None
        self._names: Optional[dict] = None

    def __len__(self) -> int:
        return self._n_records

    @property
    def lengths(self) -> np.ndarray:
        """int64 [len(ds)]: bases per record (built on first use from the memory-mapped indexes:
        the record length of each record's first piece)."""
        if self._lengths is None:
            parts = [np.asarray(s.record_lengths)[np.asarray(s.starts) == 0] for s in self._shards]
            self._lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return self._lengths

    def _pieces(self, i: int) -> range:
        """Global piece numbers of record i (0 <= i < len)."""
        before, upto = np.searchsorted(self._continued, [i, i + 1]).tolist()  # pieces continuing earlier records / record i
        return range(i + before, i + upto + 1)

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

    def _record(self, i: int) -> int:
        """Record index i (negative counts from the end) as 0..len-1; IndexError naming the range."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.directory}: record {i} out of range ({n} records)")
        return i % n

    def name(self, i: int) -> str:
        idx, _, j = self._piece(self._pieces(self._record(int(i)))[0])
        return idx.name(j)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        i = self._record(int(i))
        parts = []
        for g in self._pieces(i):
            idx, shard, j = self._piece(g)
            start = int(idx.pointers[j]) // idx.dtype.itemsize
            parts.append(self._bin(shard)[start : start + idx.length(j) * self.n_levels].reshape(-1, self.n_levels))
        return self.name(i), parts[0] if len(parts) == 1 else np.concatenate(parts)

    def find(self, name: str) -> int:
        """Index of the first record called `name` (KeyError if none). Format 3: a binary search of each
        shard's name index (memory-mapped; O(shards * log pieces), nothing built). Older formats: a
        name table built by the first call (reads every name)."""
        if all(s.name_hashes is not None for s in self._shards):
            for idx in self._shards:  # shards in record order: the first hit is the first record
                j = idx.find(name)
                if j is not None:
                    return idx.ordinal(j)
            raise KeyError(f"no record named {name!r} in {self.directory}")
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
