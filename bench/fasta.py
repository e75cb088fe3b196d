"""Synthetic FASTA for the tokenization benchmarks (bench/test_tokenize_bench.py, bench/gpu_timings.py)."""

from __future__ import annotations

import numpy as np


def write_fasta(path, n_bases: int, record_bases: int, seed: int = 0) -> None:
    """Records of `record_bases` (the last shorter), 60-column lines, mixed case, a few N."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTACGTACGTacgtN", dtype=np.uint8)
    with open(path, "wb") as f:
        done, r = 0, 0
        while done < n_bases:
            n = min(record_bases, n_bases - done)
            seq = alphabet[rng.integers(0, len(alphabet), n)]
            f.write(b">rec%d synthetic\n" % r)
            full = n // 60 * 60
            body = np.concatenate([seq[:full].reshape(-1, 60), np.full((full // 60, 1), 10, np.uint8)], axis=1)
            f.write(body.tobytes())
            if n > full:
                f.write(seq[full:].tobytes() + b"\n")
            done, r = done + n, r + 1
