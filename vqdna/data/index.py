"""Random access to decoded sequence (like samtools faidx, but over base ids): every record of a set
of FASTA/FASTQ files is decoded once into one uint8 file of base ids (memory-mapped on use) with a
small JSON table of (file, record name, offset, length). The index lives in a cache directory, keyed
by the inputs' paths, sizes, mtimes and a sha256 of their first and last MiB, so a changed input
builds a new index; it is written under a temporary name and renamed when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from vqdna.data.alphabet import BYTE_TO_ID, PAD
from vqdna.data.fasta import DEFAULT_BLOCK_SIZE, read_fasta
from vqdna.data.fingerprint import head_tail_sha256

FORMAT = "vqdna-sequence-index"
VERSION = 1
_SEQUENCE = "sequence.u8"
_TABLE = "index.json"


class StaleIndexError(ValueError):
    """An input of a SequenceIndex changed after it was decoded (SequenceIndex.check_current)."""


@dataclass(frozen=True)
class IndexRecord:
    file: str  # absolute path of the input it came from
    name: str  # first word of the header
    description: str
    offset: int  # first base in the index's sequence file
    length: int  # bases


class Windows(NamedTuple):
    """A batch of windows: ids [n, length] uint8 (PAD = 5 after the end of a record shorter than the
    window), record / start / valid [n] int64 (record index, first base, bases before padding)."""

    ids: np.ndarray
    record: np.ndarray
    start: np.ndarray
    valid: np.ndarray


def _fingerprint(path: str) -> dict:
    """Identity of an input without reading all of it: size, mtime and sha256 of both ends."""
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": head_tail_sha256(path, st.st_size)}


def _key(fingerprints: list[dict]) -> str:
    payload = {"format": FORMAT, "version": VERSION, "table": hashlib.sha256(BYTE_TO_ID.tobytes()).hexdigest(), "inputs": fingerprints}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _paths_key(paths: list[str]) -> str:
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:12]


class SequenceIndex:
    """Decoded records of some FASTA/FASTQ files, memory-mapped. Build or reuse with
    `SequenceIndex.build(paths, cache=dir)`; open a built one with `SequenceIndex.open(directory)`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        table_path = os.path.join(self.directory, _TABLE)
        try:
            with open(table_path) as f:
                table = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{table_path}: no sequence index here (build one with SequenceIndex.build)") from None
        if table.get("format") != FORMAT or table.get("version") != VERSION:
            raise ValueError(f"{table_path}: not a {FORMAT} version {VERSION} table")
        self.key: str = table["key"]
        self.inputs: list[dict] = table["inputs"]
        cols = table["records"]
        self.lengths = np.asarray(cols["length"], dtype=np.int64)
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        if not np.array_equal(self.offsets[:-1], np.asarray(cols["offset"], dtype=np.int64).reshape(-1)):
            raise ValueError(f"{table_path}: record offsets do not follow from the lengths (corrupt table)")
        self.total = int(self.offsets[-1])
        seq_path = os.path.join(self.directory, _SEQUENCE)
        size = os.path.getsize(seq_path)
        if size != self.total:
            raise ValueError(f"{seq_path}: {size} bytes, the table says {self.total} bases (corrupt or incomplete index)")
        # np.memmap cannot map an empty file.
        self.data = np.memmap(seq_path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
        files = [inp["path"] for inp in self.inputs]
        self.records = [
            IndexRecord(files[fi], name, desc, int(off), int(n))
            for fi, name, desc, off, n in zip(cols["file"], cols["name"], cols["description"], self.offsets[:-1], self.lengths)
        ]
        self._by_name: dict[str, list[int]] = {}
        for i, rec in enumerate(self.records):
            self._by_name.setdefault(rec.name, []).append(i)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike) -> "SequenceIndex":
        """Open a built index directory (no check against its inputs: see `is_current`)."""
        return cls(directory)

    @classmethod
    def build(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        cache: str | os.PathLike,
        *,
        rebuild: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        progress: bool = False,
    ) -> "SequenceIndex":
        """The index of `paths` (FASTA/FASTQ, any compression read_fasta takes) under the directory
        `cache`: reused when one for the same inputs (paths, sizes, mtimes, end hashes) exists, else
        decoded now (and older indexes of the same paths removed). Safe when several processes build
        at once (e.g. every torchrun rank): each writes a temporary directory, the first rename wins."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.path.realpath(os.fspath(p)) for p in paths]
        if not paths:
            raise ValueError("SequenceIndex.build: no input files")
        cache = os.fspath(cache)
        os.makedirs(cache, exist_ok=True)
        fingerprints = [_fingerprint(p) for p in paths]
        key = _key(fingerprints)
        prefix = f"seqidx-{_paths_key(paths)}-"
        final = os.path.join(cache, prefix + key[:20])
        if os.path.isdir(final) and not rebuild:
            return cls(final)
        tmp = tempfile.mkdtemp(prefix=f".{prefix}{key[:20]}.tmp-", dir=cache)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            cls._write(tmp, paths, fingerprints, key, block_size, progress)
            if rebuild and os.path.isdir(final):
                shutil.rmtree(final)
            try:
                os.rename(tmp, final)  # atomic: a reader sees no index or a complete one
            except OSError:
                if not os.path.isdir(final):
                    raise
                shutil.rmtree(tmp)  # another process finished the same index first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for entry in os.listdir(cache):  # older indexes of these same paths (an input changed)
            if entry.startswith(prefix) and entry != os.path.basename(final):
                shutil.rmtree(os.path.join(cache, entry), ignore_errors=True)
        return cls(final)

    @staticmethod
    def _write(directory: str, paths: list[str], fingerprints: list[dict], key: str, block_size: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        cols: dict[str, list] = {"file": [], "name": [], "description": [], "offset": [], "length": []}
        offset = 0
        bar = tqdm(total=sum(fp["size"] for fp in fingerprints), unit="B", unit_scale=True, desc="indexing", disable=not progress)
        with bar, open(os.path.join(directory, _SEQUENCE), "wb") as out:
            for fi, path in enumerate(paths):
                for rec in read_fasta(path, block_size=block_size):
                    out.write(rec.ids.data)
                    for col, value in zip(cols, (fi, rec.name, rec.description, offset, len(rec.ids))):
                        cols[col].append(value)
                    offset += len(rec.ids)
                bar.update(fingerprints[fi]["size"])
            out.flush()
            os.fsync(out.fileno())
        if [_fingerprint(p) for p in paths] != fingerprints:
            raise RuntimeError(f"an input changed while it was being indexed: {paths}")
        table = {"format": FORMAT, "version": VERSION, "key": key, "inputs": fingerprints, "total": offset, "records": cols}
        with open(os.path.join(directory, _TABLE), "w") as f:
            json.dump(table, f)
            f.flush()
            os.fsync(f.fileno())

    def is_current(self) -> bool:
        """Whether every input still has the size, mtime and end hashes it had when indexed."""
        try:
            return _key([_fingerprint(inp["path"]) for inp in self.inputs]) == self.key
        except OSError:
            return False

    def changes(self) -> list[str]:
        """What changed in the inputs since they were indexed, one line per input ("PATH: size A -> B
        bytes", "...: mtime changed", "...: first/last MiB changed", "...: cannot be read (...)"); [] if nothing."""
        out = []
        for old in self.inputs:
            path = old["path"]
            try:
                new = _fingerprint(path)
            except OSError as exc:
                out.append(f"{path}: cannot be read ({exc.strerror or exc})")
                continue
            what = [f"size {old['size']} -> {new['size']} bytes"] if new["size"] != old["size"] else []
            what += ["mtime changed"] if new["mtime_ns"] != old["mtime_ns"] else []
            what += ["first/last MiB changed"] if new["sha256_ends"] != old["sha256_ends"] else []
            if what:
                out.append(f"{path}: " + ", ".join(what))
        return out

    def check_current(self) -> None:
        """Raises StaleIndexError (naming the index and what changed in which input) when an input no
        longer matches what was decoded into this index; SequenceIndex.build(paths, cache) rebuilds it."""
        changes = self.changes()
        if not changes and _key(self.inputs) != self.key:  # same inputs, decoded by another format or byte table
            changes = [f"decoded by another {FORMAT} version or byte table"]
        if changes:
            raise StaleIndexError(
                f"the sequence index {self.directory} is stale: its input changed since it was decoded "
                f"({'; '.join(changes)}); rebuild it with SequenceIndex.build(paths, cache) (`vqdna pretrain "
                f"--genomes` does so by itself)")

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"SequenceIndex({self.directory!r}: {len(self.records)} records from {len(self.inputs)} files, {self.total:,} bases)"

    def record_index(self, record: int | str) -> int:
        """Index of a record given by position or by name (a name must be unique across the inputs)."""
        if isinstance(record, (int, np.integer)):
            i = int(record)
            if not -len(self.records) <= i < len(self.records):
                raise IndexError(f"record {i} out of range: the index has {len(self.records)} records")
            return i % len(self.records)
        hits = self._by_name.get(record)
        if not hits:
            raise KeyError(f"no record named {record!r} in {self.directory}")
        if len(hits) > 1:
            files = sorted({self.records[i].file for i in hits})
            raise KeyError(f"record name {record!r} is used {len(hits)} times (in {files}): pass the record's position instead")
        return hits[0]

    def sequence(self, record: int | str) -> np.ndarray:
        """A whole record's base ids: a read-only uint8 view [length] of the memory map."""
        i = self.record_index(record)
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def window(self, record: int | str, start: int, length: int) -> np.ndarray:
        """Bases [start, start + length) of a record: a read-only uint8 view [length] of the memory map."""
        i = self.record_index(record)
        n = int(self.lengths[i])
        if length < 0 or start < 0 or start + length > n:
            raise IndexError(f"window [{start}, {start + length}) is outside record {self.records[i].name!r} (#{i}, {n} bases)")
        o = int(self.offsets[i]) + start
        return self.data[o : o + length]

    def sample_windows(self, n: int, length: int, rng: np.random.Generator | int | None = None, *, min_acgt: int = 0) -> Windows:
        """n random windows of `length` bases, each inside one record: a record is drawn with
        probability proportional to its length (so every base is about equally likely), then a start
        uniformly among the window positions that fit. A record shorter than `length` gives the whole
        record followed by PAD (5); empty records are never drawn. Windows with fewer than `min_acgt`
        A/C/G/T bases (e.g. inside N runs) are drawn again. rng: a numpy Generator or a seed.
        Returns Windows (ids [n, length] uint8, a fresh writable array)."""
        if n < 0 or length < 1:
            raise ValueError(f"sample_windows: need n >= 0 and length >= 1, got n={n}, length={length}")
        if self.total == 0:
            raise ValueError(f"sample_windows: {self.directory} holds no bases")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        out = self._draw(n, length, rng)
        for _ in range(1000):  # only the rejected rows are drawn again
            redo = np.flatnonzero((out.ids < 4).sum(axis=1) < min_acgt) if min_acgt > 0 else ()
            if len(redo) == 0:
                return out
            again = self._draw(len(redo), length, rng)
            for mine, theirs in zip(out, again):
                mine[redo] = theirs
        raise ValueError(f"sample_windows: 1000 draws found no window of {length} with >= {min_acgt} A/C/G/T bases in {self.directory}")

    def _draw(self, n: int, length: int, rng: np.random.Generator) -> Windows:
        base = rng.integers(0, self.total, size=n)
        record = np.searchsorted(self.offsets, base, side="right") - 1  # empty records have no base
        room = np.maximum(self.lengths[record] - length, 0)
        start = rng.integers(0, room + 1).astype(np.int64)
        valid = np.minimum(self.lengths[record], length)
        cols = np.arange(length, dtype=np.int64)
        inside = cols[None, :] < valid[:, None]
        pos = np.where(inside, self.offsets[record, None] + start[:, None] + cols[None, :], 0)
        ids = np.asarray(self.data[pos.reshape(-1)]).reshape(n, length) if n else np.zeros((0, length), np.uint8)
        ids[~inside] = PAD
        return Windows(ids, record.astype(np.int64), start, valid.astype(np.int64))
