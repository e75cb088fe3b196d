"""read_fasta throughput (one core: the reader is single-threaded): a ~128 MB plain FASTA of 4
chromosome-sized records (60-column lines, mixed case, some N), the same data as gzip -6 and xz, and
building a SequenceIndex from it. Rate = bytes of decompressed FASTA text per second (MB/s = 1e6 B/s);
the ratio table shows it against the measured copy bandwidth."""

from __future__ import annotations

import gzip
import lzma
import os
import time

import numpy as np
import pytest

from bench.conftest import record, time_call
from vqdna.data import SequenceIndex, read_fasta

PLAIN_MB = 128
COMPRESSED_MB = 32  # compressing 128 MB at gzip -6 / xz would dominate the run


def _write_fasta(path, n_bytes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTACGTACGTacgtN", dtype=np.uint8)
    n_lines = n_bytes // 61
    per_record = n_lines // 4
    with open(path, "wb") as f:
        for r in range(4):
            lines = alphabet[rng.integers(0, len(alphabet), size=(per_record, 60))]
            f.write(b">chr%d synthetic record %d\n" % (r + 1, r))
            f.write(np.concatenate([lines, np.full((per_record, 1), 10, np.uint8)], axis=1).tobytes())


@pytest.fixture(scope="module")
def fasta_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fasta_bench")
    plain = root / "big.fa"
    _write_fasta(plain, PLAIN_MB << 20)
    small = root / "small.fa"
    _write_fasta(small, COMPRESSED_MB << 20, seed=1)
    data = small.read_bytes()
    (root / "small.fa.gz").write_bytes(gzip.compress(data, compresslevel=6))
    (root / "small.fa.xz").write_bytes(lzma.compress(data, preset=1))
    return {"plain": plain, "gzip": root / "small.fa.gz", "xz": root / "small.fa.xz", "small": small}


def _read_all(path) -> int:
    return sum(len(r.ids) for r in read_fasta(path))


def _cpu_seconds(fn) -> float:
    """CPU time of one call: the single-core rate even when other jobs share the cores (wall time
    on a loaded 2-core machine measures the neighbours too)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["plain", "gzip", "xz"])
def test_read_fasta_throughput(benchmark, fasta_files, kind):
    path = fasta_files[kind]
    text_bytes = os.path.getsize(fasta_files["plain" if kind == "plain" else "small"])
    benchmark.group = "read_fasta"
    bases = _read_all(path)
    cpu = _cpu_seconds(lambda: _read_all(path))
    t = time_call(benchmark, lambda: _read_all(path), "cpu", rounds=3)
    shape = {"MB": round(text_bytes / 1e6), "bases": bases, "cpu_MB_per_s": round(text_bytes / cpu / 1e6)}
    record("read_fasta", kind, "cpu", "uint8", shape, t, bytes_moved=text_bytes)
    print(f"\nread_fasta {kind}: {text_bytes / t / 1e6:.0f} MB/s wall, {text_bytes / cpu / 1e6:.0f} MB/s of one core's CPU time, {bases / t / 1e6:.0f} Mbases/s wall")
    if kind == "plain":
        assert text_bytes / cpu / 1e6 >= 100, "below the 100 MB/s target for plain FASTA on one core"


@pytest.mark.cpu
def test_sequence_index_build(benchmark, fasta_files, tmp_path):
    path = fasta_files["plain"]
    text_bytes = os.path.getsize(path)
    benchmark.group = "read_fasta"
    t = time_call(benchmark, lambda: SequenceIndex.build(path, cache=tmp_path, rebuild=True), "cpu", rounds=2)
    record("read_fasta", "SequenceIndex.build", "cpu", "uint8", {"MB": round(text_bytes / 1e6)}, t, bytes_moved=text_bytes)
    idx = SequenceIndex.build(path, cache=tmp_path)
    print(f"\nSequenceIndex.build: {text_bytes / t / 1e6:.0f} MB/s of FASTA text ({idx})")


@pytest.mark.cpu
def test_sample_windows(benchmark, fasta_files, tmp_path):
    """Training batches from the memory-mapped index: 256 windows of 256 bases."""
    idx = SequenceIndex.build(fasta_files["small"], cache=tmp_path)
    rng = np.random.default_rng(0)
    benchmark.group = "sample_windows"
    t = time_call(benchmark, lambda: idx.sample_windows(256, 256, rng), "cpu", rounds=20)
    record("sample_windows", "index", "cpu", "uint8", {"n": 256, "length": 256}, t, bytes_moved=256 * 256)
    print(f"\nsample_windows: {256 / t:.0f} windows/s ({256 * 256 / t / 1e6:.0f} Mbases/s)")
