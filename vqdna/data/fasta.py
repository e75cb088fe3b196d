"""Minimal streaming FASTA reader: plain, gzip and xz; multi-line records; CRLF; vectorised decoding
through the 256-entry byte table. Errors name the file, record and line."""

from __future__ import annotations

import gzip
import lzma
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vqdna.data.alphabet import BYTE_TO_ID, INVALID, SKIP


@dataclass
class FastaRecord:
    name: str  # first word of the header
    description: str  # the whole header line after '>'
    ids: np.ndarray  # uint8 base ids 0..4 (A C G T N)


class FastaFormatError(ValueError):
    """Malformed FASTA input; the message names the file, record and line."""


def _open(path: str | os.PathLike):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_fasta(path: str | os.PathLike) -> Iterator[FastaRecord]:
    """Yield the records of a FASTA file in order (empty records kept with length 0)."""
    path = os.fspath(path)
    name = description = None
    chunks: list[np.ndarray] = []
    try:
        with _open(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                if raw.startswith(b">"):
                    if name is not None:
                        yield FastaRecord(name, description, np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
                    description = raw[1:].decode("utf-8", errors="replace").strip()
                    name = description.split(maxsplit=1)[0] if description else ""
                    chunks = []
                    continue
                codes = BYTE_TO_ID[np.frombuffer(raw, dtype=np.uint8)]
                bad = np.flatnonzero(codes == INVALID)
                if name is None:
                    if codes.size and (codes != SKIP).any():
                        raise FastaFormatError(f"{path}: line {lineno}: sequence before the first '>' header")
                    continue
                if bad.size:
                    byte = raw[bad[0] : bad[0] + 1]
                    raise FastaFormatError(
                        f"{path}: record {name!r}, line {lineno}, column {bad[0] + 1}: byte {byte!r} is not an IUPAC base letter"
                    )
                chunks.append(codes[codes != SKIP])
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise FastaFormatError(f"{path}: truncated or corrupt compressed stream ({exc})") from exc
    if name is not None:
        yield FastaRecord(name, description, np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))


def bundled_fasta(name: str = "lambda.fa.gz") -> str:
    """Path of a FASTA file shipped with the package (see vqdna/data/fixtures/SOURCES.md)."""
    return os.path.join(os.path.dirname(__file__), "fixtures", name)
