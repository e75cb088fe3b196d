"""Tiny stand-ins for the examples' data (docs/data.md), written into a test's tmp_path: random genomes
under the genome files' names and compressions, and GUE-format task folders (sequence,label CSVs)."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import numpy as np


def random_dna(rng: np.random.Generator, length: int, gc: float) -> str:
    """`length` random bases with G+C fraction `gc`."""
    p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return "".join(rng.choice(list("ACGT"), p=p, size=length))


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    """records (name, sequence) as FASTA with 60-column lines, compressed as the file name says."""
    text = "".join(f">{name}\n" + "".join(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60))
                   for name, seq in records).encode()
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wb") as f:
        f.write(text)
    return path


def write_gue_task(folder: Path, sizes=(48, 16, 16), length: int = 70, seed: int = 0) -> Path:
    """A GUE-format task folder: train/dev/test.csv with header `sequence,label`; label 1 = GC-rich."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "dev", "test"), sizes):
        rows = [(random_dna(rng, length, 0.65 if i % 2 else 0.35), i % 2) for i in range(n)]
        (folder / f"{split}.csv").write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return folder
