"""Streaming tokenization (docs/design.md §2.5): FASTA files -> token files (docs/token-files.md).

    settings.py     Settings: the run's options, typed, frozen, validated once; TokenizeError
    units.py        work units: each input cut into shards' worth of pieces (plain FASTA: byte ranges)
    packing.py      windows with their halo, packed into rows and batches for the encoder
    token_files.py  the format: manifest, shard .bin/.idx writing, reading and checks
    directory.py    the output directory: run manifest, lock, resume checks, final manifest
    pipeline.py     one rank's reader -> compute -> writer threads; TokenizeStats
    distributed.py  torch.distributed glue (rank-0 steps, error and statistics collectives)
    run.py          tokenize_files, the entry point

The entry point is imported on first use, so `import vqdna.data` (which reads token files) does not
import the pipeline and torch.
"""

from __future__ import annotations

__all__ = ["Settings", "TokenizeError", "TokenizeStats", "tokenize_files", "work_units"]

_WHERE = {
    "Settings": "vqdna.streaming.settings",
    "TokenizeError": "vqdna.streaming.settings",
    "TokenizeStats": "vqdna.streaming.pipeline",
    "tokenize_files": "vqdna.streaming.run",
    "work_units": "vqdna.streaming.units",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vqdna.streaming' has no attribute {name!r}")
