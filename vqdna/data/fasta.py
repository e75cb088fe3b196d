"""Streaming FASTA / FASTQ reader: plain, gzip (bgzip and any multi-member gzip), bz2 and xz files;
multi-line records, CRLF, blank lines, empty records. The input is read in large blocks and decoded
with the 256-entry byte table (vqdna.data.alphabet) by C-level bytes operations over whole blocks;
Python only loops per record (FASTA) or per line (FASTQ, where lines are short reads). Errors are
FastaFormatError and name the file, the record, the 1-based line and, for a bad byte, the column."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from vqdna.data.alphabet import BYTE_TO_ID, INVALID, SKIP

DEFAULT_BLOCK_SIZE = 8 << 20  # bytes per read: large enough that per-block Python work is noise

_TABLE = BYTE_TO_ID.tobytes()
_WHITESPACE = bytes(b for b in range(256) if BYTE_TO_ID[b] == SKIP)
_INVALID = bytes([INVALID])
_HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in headers
_QUALITY = bytes(range(33, 127))  # Phred+33 ('!'..'~')
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", gzip.open),
    (b"\xfd7zXZ\x00", "xz", lzma.open),
    (b"BZh", "bz2", bz2.open),
)
_UNSUPPORTED = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"), (b"\x04\x22\x4d\x18", "lz4"))


@dataclass
class FastaRecord:
    name: str  # first word of the header
    description: str  # the whole header line after '>' (or '@'), stripped
    ids: np.ndarray  # [length] uint8 base ids 0..4 (A C G T N), writable
    offset: int = -1  # FASTA: byte offset of the '>' of its header in the (decompressed) text; FASTQ: -1


class FastaFormatError(ValueError):
    """Malformed FASTA/FASTQ input; the message names the file, record and line (and column)."""


class _Cursor:
    """What error messages need: the file, the record being read, and (error path only) the line and
    column of a byte offset into the decompressed text, found by reading the file again up to it, so
    the hot path never counts newlines."""

    def __init__(self, path: str):
        self.path = path
        self.record: str | None = None  # name of the record being read

    def error(self, message: str, line: int | None = None, column: int | None = None, record: str | None = None) -> FastaFormatError:
        record = self.record if record is None else record
        where = [f"record {record!r}"] if record is not None else []
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column}")
        return FastaFormatError(f"{self.path}: {', '.join(where)}: {message}" if where else f"{self.path}: {message}")

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of the byte at `offset` of the decompressed text."""
        lines = col = done = 0
        handle, compressed = _open(self.path)
        with handle:
            while done < offset:
                try:  # read1 for compressed input: never reads past the offset into damage
                    n = min(offset - done, DEFAULT_BLOCK_SIZE)
                    chunk = handle.read1(n) if compressed else handle.read(n)
                except (EOFError, zlib.error, lzma.LZMAError, OSError):
                    break
                if not chunk:
                    break
                last_nl = chunk.rfind(b"\n")
                col = col + len(chunk) if last_nl < 0 else len(chunk) - last_nl - 1
                lines += chunk.count(b"\n")
                done += len(chunk)
        return lines + 1, col + 1


def _bad_byte_message(byte: int) -> str:
    if byte < 0x20 or byte >= 0x7F:
        return f"non-text byte 0x{byte:02x} (binary data, not sequence text)"
    return f"byte {bytes([byte])!r} is not an IUPAC base letter"


def _open(path: str) -> tuple[BinaryIO, bool]:
    """(binary stream of the decompressed bytes, whether it is compressed), chosen by magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, _, opener in _COMPRESSED:
        if magic.startswith(prefix):
            return opener(path, "rb"), True
    for prefix, kind in _UNSUPPORTED:
        if magic.startswith(prefix):
            raise FastaFormatError(f"{path}: {kind}-compressed input is not supported (use gzip, bgzip, bz2 or xz)")
    return open(path, "rb"), False


def _blocks(handle: BinaryIO, compressed: bool, block_size: int, cursor: _Cursor) -> Iterator[bytes]:
    """Blocks of up to block_size decompressed bytes. A truncated or corrupt compressed stream
    becomes a FastaFormatError at the line where the readable data ends: compressed input is read
    with read1 (one decompression step each), so the data before the damage is decoded first."""
    if not compressed:
        while block := handle.read(block_size):
            yield block
        return
    pending: list[bytes] = []
    size = done = 0  # done: bytes yielded (and, as the consumer pulls lazily, consumed)
    while True:
        try:
            chunk = handle.read1(block_size - size)
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            # A real I/O error (errno set) is not a format problem; bz2/gzip format errors have no errno.
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            if pending:
                yield b"".join(pending)
                done += size
            raise cursor.error(f"truncated or corrupt compressed stream ({exc})", line=cursor.position(done)[0]) from exc
        if chunk:
            pending.append(chunk)
            size += len(chunk)
        if size >= block_size or (not chunk and pending):
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, done, size = [], done + size, 0
        if not chunk:
            return


class _FastaParser:
    """Block-wise FASTA: headers are found with bytes.find('>'); everything between headers is
    sequence, decoded per block segment with bytes.translate (table + whitespace deletion)."""

    def __init__(self, cursor: _Cursor):
        self.cursor = cursor
        self.name: str | None = None
        self.description = ""
        self.chunks: list[bytes] = []
        self.offset = 0  # of the current block in the decompressed text
        self.header_offset = -1  # of the current record's '>'

    def _record(self) -> FastaRecord:
        ids = np.frombuffer(bytearray().join(self.chunks), dtype=np.uint8)  # one copy, writable
        return FastaRecord(self.name, self.description, ids, self.header_offset)

    def _sequence(self, buf: bytes, start: int, end: int) -> None:
        seg = buf[start:end]  # the whole block is not copied (full slice of bytes is the object)
        ids = seg.translate(_TABLE, _WHITESPACE)
        if _INVALID in ids:
            codes = BYTE_TO_ID[np.frombuffer(seg, dtype=np.uint8)]
            p = start + int(np.argmax(codes == INVALID))
            raise self.cursor.error(_bad_byte_message(buf[p]), *self.cursor.position(self.offset + p))
        if not ids:
            return
        if self.name is None:
            p = start + len(seg) - len(seg.lstrip(_WHITESPACE))
            raise self.cursor.error("sequence before the first '>' header", *self.cursor.position(self.offset + p))
        self.chunks.append(ids)

    def _header(self, raw: bytes, offset: int) -> None:
        """Start a record from the header line `raw` (without '>' and '\\n') that starts at `offset`."""
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        bad = _HEADER_CONTROL.search(raw)
        if bad is not None:
            raise self.cursor.error(_bad_byte_message(raw[bad.start()]) + " in a header", self.cursor.position(offset)[0], bad.start() + 2, record=None)
        self.description = raw.decode("utf-8", errors="replace").strip()
        self.name = self.description.split(maxsplit=1)[0] if self.description else ""
        self.cursor.record = self.name
        self.chunks = []
        self.header_offset = offset

    def parse(self, blocks: Iterable[bytes]) -> Iterator[FastaRecord]:
        header: list[bytes] | None = None  # pieces of a header line that spans blocks
        header_offset = 0
        at_line_start = True
        for buf in blocks:
            n = len(buf)
            pos = 0
            if header is not None:
                nl = buf.find(b"\n")
                if nl < 0:
                    header.append(buf)
                    self.offset += n
                    continue
                header.append(buf[:nl])
                if self.name is not None:
                    yield self._record()
                self._header(b"".join(header), header_offset)
                header = None
                pos = nl
            while pos < n:
                g = buf.find(b">", pos)
                if g < 0:
                    self._sequence(buf, pos, n)
                    break
                if not (buf[g - 1] == 10 if g > 0 else at_line_start):
                    self._sequence(buf, pos, g + 1)  # '>' inside a sequence line: raises
                    raise AssertionError("unreachable: '>' is not a base letter")
                self._sequence(buf, pos, g)
                nl = buf.find(b"\n", g)
                if nl < 0:
                    header, header_offset = [buf[g + 1 :]], self.offset + g
                    break
                if self.name is not None:
                    yield self._record()
                self._header(buf[g + 1 : nl], self.offset + g)
                pos = nl
            at_line_start = buf.endswith(b"\n")
            self.offset += n
        if header is not None:  # a last header line with no line end
            if self.name is not None:
                yield self._record()
            self._header(b"".join(header), header_offset)
        if self.name is not None:
            yield self._record()


def _lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Complete lines (without '\\n') of a block stream; a line may span any number of blocks."""
    carry: list[bytes] = []
    for buf in blocks:
        parts = buf.split(b"\n")
        if len(parts) == 1:
            carry.append(buf)
            continue
        if carry:
            carry.append(parts[0])
            parts[0] = b"".join(carry)
            carry = []
        last = parts.pop()
        yield from parts
        if last:
            carry = [last]
    if carry:
        yield b"".join(carry)


def _parse_fastq(blocks: Iterable[bytes], cursor: _Cursor) -> Iterator[FastaRecord]:
    """FASTQ: '@' header, sequence line(s), '+' line (empty or repeating the header), quality line(s)
    until as many quality characters as bases. Blank lines between records are allowed."""
    lineno = 0
    state = 0  # 0: expect a header, 1: sequence lines, 2: quality lines
    header = b""
    seq: list[bytes] = []
    seq_line = seq_len = qual_len = qual_lines = 0
    for line in _lines(blocks):
        lineno += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if state == 0:
            if not line.strip(_WHITESPACE):
                continue
            if line[0] != 64:  # '@'
                raise cursor.error("expected a FASTQ '@' header line", lineno, 1)
            bad = _HEADER_CONTROL.search(line)
            if bad is not None:
                raise cursor.error(_bad_byte_message(line[bad.start()]) + " in a header", lineno, bad.start() + 1, record=None)
            header = line[1:]
            description = header.decode("utf-8", errors="replace").strip()
            cursor.record = description.split(maxsplit=1)[0] if description else ""
            seq, seq_line, seq_len, state = [], lineno + 1, 0, 1
        elif state == 1:
            if line.startswith(b"+"):
                if len(line) > 1 and line[1:] != header:
                    raise cursor.error("the '+' line neither is empty nor repeats the header", lineno, 2)
                state, qual_len, qual_lines = 2, 0, 0
            elif line.startswith(b"@"):
                raise cursor.error("FASTQ record has no '+' line and quality (a new '@' header follows its sequence)", lineno, 1)
            else:
                seq.append(line)
                seq_len += len(line)
        else:
            # A quality line may begin with '@'; but one that overflows, or comes after as many quality
            # lines as the sequence had (wrapped quality mirrors the wrapped sequence), is the next
            # record's header: this record's quality ended short.
            if line.startswith(b"@") and qual_lines and (qual_len + len(line) > seq_len or qual_lines >= len(seq)):
                raise cursor.error(f"quality has {qual_len} characters, the sequence {seq_len} bases", lineno - 1)
            qual_len += len(line)
            qual_lines += 1
            bad_qual = line.translate(None, _QUALITY)
            if bad_qual:
                col = line.index(bad_qual[:1]) + 1
                raise cursor.error(f"byte {bad_qual[:1]!r} is no FASTQ quality character ('!'..'~')", lineno, col)
            if qual_len > seq_len:
                raise cursor.error(f"quality has more characters ({qual_len}) than the sequence has bases ({seq_len})", lineno)
        if state == 2 and qual_len == seq_len:
            joined = b"".join(seq)
            ids = joined.translate(_TABLE, _WHITESPACE)
            if _INVALID in ids:
                for i, s in enumerate(seq):
                    if _INVALID in s.translate(_TABLE):
                        col = int(np.argmax(BYTE_TO_ID[np.frombuffer(s, dtype=np.uint8)] == INVALID))
                        raise cursor.error(_bad_byte_message(s[col]), seq_line + i, col + 1)
            yield FastaRecord(cursor.record, description, np.frombuffer(bytearray(ids), dtype=np.uint8))
            state = 0
    if state != 0:
        part = "quality" if state == 2 else "'+' line and quality"
        raise cursor.error(f"the file ends inside a FASTQ record (missing {part}; truncated?)", lineno)


def read_fasta(path: str | os.PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE, start: int = 0) -> Iterator[FastaRecord]:
    """Yield the records of a FASTA or FASTQ file in order (format from the first non-blank byte:
    '>' FASTA, '@' FASTQ). Plain, gzip/bgzip, bz2 or xz (detected by magic bytes). Each record's
    .ids is a writable uint8 array [length] of 0..4 (A C G T N; any case, U -> T, other IUPAC -> N);
    empty records are kept with length 0. Raises FastaFormatError (a ValueError) on malformed input,
    naming the file, record, line and column. block_size: bytes decoded per step (tests use tiny ones).
    start: a FASTA record's `offset` (from an earlier read): read from that record on (a plain file
    seeks; a compressed one is decompressed up to it, not parsed); error lines stay those of the file."""
    path = os.fspath(path)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    cursor = _Cursor(path)
    handle, compressed = _open(path)
    with handle:
        if start:
            handle.seek(start)
            if handle.read(1) != b">":
                raise cursor.error(f"byte offset {start} is not the start of a FASTA record ('>')")
            handle.seek(start)
            parser = _FastaParser(cursor)
            parser.offset = start
            yield from parser.parse(_blocks(handle, compressed, block_size, cursor))
            return
        blocks = _blocks(handle, compressed, block_size, cursor)
        head: list[bytes] = []
        first = None
        for buf in blocks:  # find the first non-blank byte (blank blocks are rare and tiny)
            head.append(buf)
            stripped = buf.lstrip(_WHITESPACE)
            if stripped:
                first = stripped[0]
                break
        if first is None:
            return
        stream = _chain(head, blocks)
        if first == 64:  # '@'
            yield from _parse_fastq(stream, cursor)
        elif first == 62 or BYTE_TO_ID[first] != INVALID:  # '>' or a base letter (sequence before a header)
            yield from _FastaParser(cursor).parse(stream)
        else:
            data = b"".join(head)
            p = len(data) - len(data.lstrip(_WHITESPACE))
            line = data.count(b"\n", 0, p) + 1
            raise cursor.error(f"{_bad_byte_message(first)}: not FASTA ('>') or FASTQ ('@') text", line, p - data.rfind(b"\n", 0, p))


def _chain(head: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from head
    yield from rest


def bundled_fasta(name: str = "lambda.fa.gz") -> str:
    """Path of a FASTA file shipped with the package (see vqdna/data/fixtures/SOURCES.md)."""
    return os.path.join(os.path.dirname(__file__), "fixtures", name)


_IS_WHITESPACE = (BYTE_TO_ID == SKIP).astype(np.int32)  # per byte value: 1 for whitespace
_SPARSE = 64  # headers in a block below which sequence stretches are counted with bytes.translate


def fasta_record_lengths(path: str | os.PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
    """The records of a FASTA file without decoding them: batches (one per block) of (offsets, lengths),
    int64 [records], each record's '>' offset in the (decompressed) text (FastaRecord.offset) and its
    base count (the non-whitespace bytes of its sequence lines: len(FastaRecord.ids) for a well-formed
    file). None when the file's first non-blank byte is not '>' (FASTQ, or an error read_fasta reports).
    Bytes are not checked: a bad byte counts as a base until read_fasta refuses it. Vectorised per
    block (numpy, bytes.translate), no Python per record: what planning a run needs, at I/O speed."""
    path = os.fspath(path)
    handle, compressed = _open(path)
    with handle:
        blank = b""  # the last blank chunk: whether the first '>' starts a line
        while True:
            chunk = handle.read(1 << 16)
            if not chunk:
                return None
            first = chunk.lstrip(_WHITESPACE)
            if first:
                blank = chunk[: len(chunk) - len(first)] or blank
                break
            blank = chunk
    if first[0] != 62 or not (blank == b"" or blank.endswith(b"\n")):  # not a '>' at a line start
        return None
    return _record_lengths(path, block_size)


def _record_lengths(path: str, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    cursor = _Cursor(path)
    handle, compressed = _open(path)
    with handle:
        offset, at_line_start, in_header = 0, True, False
        current = -1  # offset of the record being counted (-1: none yet; only blanks before the first '>')
        count = 0  # its bases so far
        for buf in _blocks(handle, compressed, block_size, cursor):
            n = len(buf)
            arr = np.frombuffer(buf, dtype=np.uint8)
            seq_from = 0  # where the current record's sequence goes on in this block
            if in_header:
                nl = buf.find(b"\n")
                if nl < 0:
                    offset += n
                    continue
                in_header, seq_from = False, nl + 1
            gt = np.flatnonzero(arr == 62)
            if gt.size:
                before = arr[np.maximum(gt - 1, 0)] == 10
                if gt[0] == 0:
                    before[0] = at_line_start and seq_from == 0
                heads = gt[before & (gt >= seq_from)]
            else:
                heads = gt
            if heads.size == 0:  # the common block of a long record: one stretch of sequence
                count += len(buf[seq_from:].translate(None, _WHITESPACE)) if seq_from else len(buf.translate(None, _WHITESPACE))
            else:
                newlines = np.flatnonzero(arr == 10)
                k = np.searchsorted(newlines, heads)
                in_header = bool(k[-1] == newlines.size)  # the last header line goes on in the next block
                ends = np.append(newlines, n - 1)[k] + 1  # sequence starts after the header line (n: not here)
                # Stretches of sequence: [seq_from, heads[0]) ends the current record, [ends[i], heads[i + 1])
                # is record i's, [ends[-1], n) the last one's so far.
                lo = np.concatenate([[seq_from], ends])
                hi = np.append(heads, n)
                if heads.size < _SPARSE:
                    bases = np.fromiter((len(buf[a:b].translate(None, _WHITESPACE)) for a, b in zip(lo.tolist(), hi.tolist())), np.int64, count=lo.size)
                else:
                    ws = np.zeros(n + 1, dtype=np.int32)  # whitespace bytes before each position
                    np.cumsum(_IS_WHITESPACE[arr], out=ws[1:])
                    bases = (hi - lo) - (ws[hi] - ws[lo]).astype(np.int64)
                offsets, lengths = offset + heads[:-1], bases[1:-1]
                if current >= 0:  # bases[0] ends the record begun in an earlier block (else: blanks)
                    offsets, lengths = np.append(current, offsets), np.append(count + bases[0], lengths)
                yield offsets.astype(np.int64), lengths.astype(np.int64)
                current, count = offset + int(heads[-1]), int(bases[-1])
            at_line_start = buf[-1:] == b"\n"  # a '>' mid-line is malformed: read_fasta refuses it
            offset += n
        if current >= 0:
            yield np.array([current], np.int64), np.array([count], np.int64)
