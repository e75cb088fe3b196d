"""Sequence data: the byte table and FASTA reading."""

from vqdna.data.alphabet import BASES, BYTE_TO_ID
from vqdna.data.fasta import FastaFormatError, FastaRecord, bundled_fasta, read_fasta

__all__ = ["BASES", "BYTE_TO_ID", "FastaFormatError", "FastaRecord", "bundled_fasta", "read_fasta"]
