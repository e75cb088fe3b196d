"""Sequence data: the byte table, FASTA/FASTQ reading and the random-access sequence index."""

from vqdna.data.alphabet import BASES, BYTE_TO_ID, PAD
from vqdna.data.fasta import FastaFormatError, FastaRecord, bundled_fasta, read_fasta
from vqdna.data.index import IndexRecord, SequenceIndex, StaleIndexError, Windows

__all__ = [
    "BASES",
    "BYTE_TO_ID",
    "PAD",
    "FastaFormatError",
    "FastaRecord",
    "IndexRecord",
    "SequenceIndex",
    "StaleIndexError",
    "TokenDataset",
    "TokenFileError",
    "Windows",
    "bundled_fasta",
    "read_fasta",
]


def __getattr__(name: str):
    # Imported on first use: vqdna.data.tokens reads through vqdna.streaming.token_files, which itself
    # imports vqdna.data.integrity (an eager import here would be circular).
    if name in ("TokenDataset", "TokenFileError"):
        from vqdna.data import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module 'vqdna.data' has no attribute {name!r}")
