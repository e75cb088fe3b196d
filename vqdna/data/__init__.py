"""Sequence data: the byte table, FASTA/FASTQ reading and the random-access sequence index."""

from vqdna.data.alphabet import BASES, BYTE_TO_ID, PAD
from vqdna.data.fasta import FastaFormatError, FastaRecord, bundled_fasta, read_fasta
from vqdna.data.index import IndexRecord, SequenceIndex, Windows
from vqdna.data.tokens import TokenDataset, TokenFileError

__all__ = [
    "BASES",
    "BYTE_TO_ID",
    "PAD",
    "FastaFormatError",
    "FastaRecord",
    "IndexRecord",
    "SequenceIndex",
    "TokenDataset",
    "TokenFileError",
    "Windows",
    "bundled_fasta",
    "read_fasta",
]
