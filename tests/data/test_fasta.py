"""read_fasta against a per-character reference parser and against the generator's own records:
random FASTA/FASTQ (awkward line widths, CRLF, blank lines, empty records, any case, IUPAC, U) in
every supported compression, decoded with block sizes down to 1 byte so block boundaries fall inside
headers, line ends and records; real sequence fixtures; and the malformed-input corpus, where every
error must name the file, the record and the exact line (and column)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

import numpy as np
import pytest

from vqdna.data import FastaFormatError, bundled_fasta, read_fasta
from vqdna.data import fasta as fasta_mod
from vqdna.data.fasta import DEFAULT_BLOCK_SIZE, fasta_record_lengths

BLOCK_SIZES = [1, 2, 3, 7, 64, DEFAULT_BLOCK_SIZE]

# docs/design.md §1: A C G T N = 0..4, any case, U -> T, every other IUPAC letter -> N. Written out here
# independently of vqdna.data.alphabet.
REF_CODE = {**{c: i for i, c in enumerate("ACGT")}, "U": 3, **{c: 4 for c in "RYSWKMBDHVN"}}
LETTERS = "ACGTUNRYSWKMBDHV" + "ACGTUNRYSWKMBDHV".lower()
WHITESPACE = " \t\r\v\f"


def ref_parse_fasta(text: bytes) -> list[tuple[str, str, list[int]]]:
    """The simplest FASTA parser: one character at a time."""
    records: list[tuple[str, str, list[int]]] = []
    header: list[str] | None = None
    at_line_start = True
    for ch in text.decode("latin-1"):
        if header is not None:
            if ch == "\n":
                desc = "".join(header).rstrip("\r").strip()
                records.append((desc.split()[0] if desc else "", desc, []))
                header = None
                at_line_start = True
            else:
                header.append(ch)
            continue
        if ch == ">" and at_line_start:
            header = []
            continue
        at_line_start = ch == "\n"
        if ch == "\n" or ch in WHITESPACE:
            continue
        assert records, "sequence before the first header"
        records[-1][2].append(REF_CODE[ch.upper()])
    if header is not None:
        desc = "".join(header).rstrip("\r").strip()
        records.append((desc.split()[0] if desc else "", desc, []))
    return records


def codes(seq: str) -> list[int]:
    return [REF_CODE[c.upper()] for c in seq]


def random_records(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """(name, description, sequence) with empty, tiny and line-width-sized records."""
    records = []
    for i in range(n):
        length = int(rng.choice([0, 1, 2, 59, 60, 61, int(rng.integers(0, 300))]))
        seq = "".join(rng.choice(list(LETTERS), size=length))
        name = f"r{i}_{int(rng.integers(1000))}"
        desc = name + rng.choice(["", " desc", " a\tb >c", " x=1 y=2"])
        records.append((name, desc, seq))
    return records


def write_fasta(records, rng: np.random.Generator, crlf: bool) -> bytes:
    nl = "\r\n" if crlf else "\n"
    out = [nl] * int(rng.integers(0, 3))  # leading blank lines
    for _, desc, seq in records:
        out.append(rng.choice([">", "> "]) + desc + nl)
        width = int(rng.choice([1, 7, 60, 61, 80, 1000]))
        for j in range(0, len(seq), width):
            out.append(seq[j : j + width] + rng.choice(["", "", "", " ", "\t"]) + nl)
            if rng.random() < 0.1:
                out.append(nl)  # blank line inside a record
    text = "".join(out)
    if text.endswith(nl) and rng.random() < 0.3:
        text = text[: -len(nl)]  # no final line end
    return text.encode()


def write_fastq(records, rng: np.random.Generator, crlf: bool) -> bytes:
    """Single-line or wrapped FASTQ; wrapped quality lines may begin with '@' or '+'."""
    nl = "\r\n" if crlf else "\n"
    wrap = rng.random() < 0.5
    out = []
    for _, desc, seq in records:
        qual = "".join(chr(c) for c in rng.integers(33, 127, size=len(seq)))
        out.append("@" + desc + nl)
        width = int(rng.choice([3, 7, 60])) if wrap else max(len(seq), 1)
        out += [seq[j : j + width] + nl for j in range(0, len(seq), width)] or ([nl] if not wrap else [])
        out.append(("+" + desc if rng.random() < 0.5 else "+") + nl)
        out += [qual[j : j + width] + nl for j in range(0, len(qual), width)] or ([nl] if not wrap else [])
        if rng.random() < 0.1:
            out.append(nl)
    return "".join(out).encode()


def bgzf(data: bytes, block: int = 1000) -> bytes:
    """BGZF (bgzip): gzip members carrying the 'BC' block-size field, then the EOF member."""
    out = []
    for i in range(0, len(data), block):
        chunk = data[i : i + block]
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        cdata = comp.compress(chunk) + comp.flush()
        header = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<HBBHH", 6, 66, 67, 2, len(cdata) + 25)
        out.append(header + cdata + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    out.append(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))
    return b"".join(out)


def multi_member_gzip(data: bytes, rng: np.random.Generator) -> bytes:
    """Concatenated gzip members split at random bytes (inside headers, CRLF, anywhere)."""
    cuts = sorted(set(int(c) for c in rng.integers(0, len(data) + 1, size=4))) + [len(data)]
    start, parts = 0, []
    for c in cuts:
        parts.append(gzip.compress(data[start:c]))
        start = c
    return b"".join(parts)


COMPRESSIONS = {
    "plain": lambda data, rng: data,
    "gzip": lambda data, rng: gzip.compress(data),
    "multigzip": multi_member_gzip,
    "bgzf": lambda data, rng: bgzf(data),
    "xz": lambda data, rng: lzma.compress(data),
    "bz2": lambda data, rng: bz2.compress(data),
}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _check(records, expected):
    assert [(r.name, r.description) for r in records] == [(name, desc) for name, desc, _ in expected]
    for rec, (_, _, ids) in zip(records, expected):
        assert rec.ids.dtype == np.uint8 and rec.ids.flags.writeable
        np.testing.assert_array_equal(rec.ids, np.asarray(ids, dtype=np.uint8), err_msg=rec.name)


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("seed", range(3))
def test_random_fasta_matches_reference(tmp_path, compression, crlf, seed):
    rng = np.random.default_rng(_seed(compression, crlf, seed))
    truth = random_records(rng, int(rng.integers(1, 12)))
    text = write_fasta(truth, rng, crlf)
    expected = ref_parse_fasta(text)
    # the reference parser and the generator agree (so the reference itself is checked)
    assert [(n, d, ids) for n, d, ids in expected] == [(n, d, codes(s)) for n, d, s in truth]
    path = tmp_path / f"x.fa.{compression}"
    path.write_bytes(COMPRESSIONS[compression](text, rng))
    for block_size in BLOCK_SIZES:
        _check(list(read_fasta(path, block_size=block_size)), expected)


def _check_scan(path):
    """fasta_record_lengths(path) gives read_fasta's (offset, len(ids)) per record, at every block size."""
    want = [(r.offset, len(r.ids)) for r in read_fasta(path)]
    for block_size in BLOCK_SIZES:
        batches = list(fasta_record_lengths(path, block_size=block_size))
        assert all(o.dtype == n.dtype == np.int64 for o, n in batches)
        assert [(int(o), int(n)) for offsets, lengths in batches for o, n in zip(offsets, lengths)] == want, block_size


@pytest.mark.parametrize("compression", ["plain", "multigzip", "bz2"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("sparse", [0, 1 << 30], ids=["cumsum", "translate"])
def test_record_lengths_without_decoding_match_read_fasta(tmp_path, monkeypatch, compression, crlf, sparse):
    """fasta_record_lengths (planning's scan) gives each record's '>' offset and base count exactly as
    read_fasta does, whatever the block boundaries cut (headers, CRLF, blank lines), on both of its
    counting paths (per-block whitespace cumsum for many headers, bytes.translate for few)."""
    monkeypatch.setattr(fasta_mod, "_SPARSE", sparse)
    rng = np.random.default_rng(_seed(compression, crlf, sparse))
    text = write_fasta(random_records(rng, 40), rng, crlf)
    path = tmp_path / f"x.fa.{compression}"
    path.write_bytes(COMPRESSIONS[compression](text, rng))
    _check_scan(path)


@pytest.mark.parametrize("text", [b">a", b">a\n>b\n\n>c d\nAC", b"\n\n>\nAC\n", b">a>b c\nA\n>\n", b"\n\n \n>x\nA C\n"])
def test_record_lengths_edge_cases(tmp_path, text):
    path = tmp_path / "x.fa"
    path.write_bytes(text)
    _check_scan(path)


@pytest.mark.parametrize("text", [b"", b"\n \n", b"@r\nAC\n+\nII\n", b"AC\n>a\nA\n", b"\n >a\nA\n"])
def test_record_lengths_leave_fastq_and_errors_to_read_fasta(tmp_path, text):
    """Not FASTA from its first non-blank byte on: None (the caller reads the file with read_fasta)."""
    path = tmp_path / "x.fa"
    path.write_bytes(text)
    assert fasta_record_lengths(path) is None


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_record_offsets_and_reading_from_one(tmp_path, compression):
    """Each FASTA record's offset is its '>' in the decompressed text, and read_fasta(start=offset)
    yields that record and the rest (what a rank reads of its planned work units)."""
    rng = np.random.default_rng(_seed("offsets", compression))
    text = write_fasta(random_records(rng, 9), rng, crlf=False)
    expected = ref_parse_fasta(text)
    path = tmp_path / f"x.fa.{compression}"
    path.write_bytes(COMPRESSIONS[compression](text, rng))
    for block_size in (3, 1 << 20):
        records = list(read_fasta(path, block_size=block_size))
        assert all(text[r.offset : r.offset + 1] == b">" for r in records)
        assert len({r.offset for r in records}) == len(records)
        for i in (1, len(records) - 1):
            _check(list(read_fasta(path, block_size=block_size, start=records[i].offset)), expected[i:])
    with pytest.raises(FastaFormatError, match="is not the start of a FASTA record"):
        list(read_fasta(path, start=records[1].offset + 1))


@pytest.mark.parametrize("compression", ["plain", "gzip", "bgzf", "xz"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("seed", range(3))
def test_random_fastq_matches_generator(tmp_path, compression, crlf, seed):
    rng = np.random.default_rng(_seed("fastq", compression, crlf, seed))
    truth = random_records(rng, int(rng.integers(1, 12)))
    text = write_fastq(truth, rng, crlf)
    path = tmp_path / f"x.fq.{compression}"
    path.write_bytes(COMPRESSIONS[compression](text, rng))
    for block_size in BLOCK_SIZES:
        _check(list(read_fasta(path, block_size=block_size)), [(n, d, codes(s)) for n, d, s in truth])


@pytest.mark.parametrize(
    "text,expected",
    [
        (b"", []),
        (b"\n\r\n  \n", []),
        (b">a", [("a", "a", [])]),
        (b">a\n>b\n\n>c d\nAC", [("a", "a", []), ("b", "b", []), ("c", "c d", [0, 1])]),
        (b">\nAC\n", [("", "", [0, 1])]),
        (b">a>b c\nA\n", [("a>b", "a>b c", [0])]),
        (b"@\n\n+\n\n", [("", "", [])]),
        (b"@r\nAC\n+\n@@\n@s\nG\n+s\n+\n", [("r", "r", [0, 1]), ("s", "s", [2])]),
    ],
    ids=["empty", "blank", "header-only", "empty-records", "no-name", "gt-in-header", "fastq-empty", "fastq-at-plus-quality"],
)
def test_edge_cases(tmp_path, text, expected):
    path = tmp_path / "x.txt"
    path.write_bytes(text)
    for block_size in BLOCK_SIZES:
        _check(list(read_fasta(path, block_size=block_size)), expected)


@pytest.mark.parametrize("name", ["lambda.fa.gz", "human_chr17_slice.fa.gz", "yeast_orfs.fa.gz"])
def test_real_sequence_fixtures(name):
    path = bundled_fasta(name)
    with gzip.open(path, "rb") as f:
        expected = ref_parse_fasta(f.read())
    for block_size in [1000, DEFAULT_BLOCK_SIZE]:  # 1000: the chr17 slice's 40 kb line spans 40 blocks
        _check(list(read_fasta(path, block_size=block_size)), expected)
    lengths = {"lambda.fa.gz": [48502], "human_chr17_slice.fa.gz": [40000]}
    if name in lengths:
        assert [len(e[2]) for e in expected] == lengths[name]
    if name == "yeast_orfs.fa.gz":
        assert len(expected) == 7 and sum(len(e[2]) for e in expected) == 26339


# The malformed-input corpus: (input, the exact message after "<path>: ").
MALFORMED = {
    "bad-letter": (b">r1 x\nACGT\nACXT\n", "record 'r1', line 3, column 3: byte b'X' is not an IUPAC base letter"),
    "bad-letter-crlf": (b">r1\r\nACGT\r\n\r\nAC-T\r\n", "record 'r1', line 4, column 3: byte b'-' is not an IUPAC base letter"),
    "bad-letter-2nd-record": (b">a\nAC\n>b x\n\nGGQ\n", "record 'b', line 5, column 3: byte b'Q' is not an IUPAC base letter"),
    "digit": (b">a\nACGT1\n", "record 'a', line 2, column 5: byte b'1' is not an IUPAC base letter"),
    "gt-mid-line": (b">a\nACGT\nAC>G\n", "record 'a', line 3, column 3: byte b'>' is not an IUPAC base letter"),
    "indented-header": (b">a\nAC\n  >b\nAC\n", "record 'a', line 3, column 3: byte b'>' is not an IUPAC base letter"),
    "before-header": (b"\n\n  ACGT\n>r\nAC\n", "line 3, column 3: sequence before the first '>' header"),
    "nul-in-sequence": (b">a\nAC\x00G\n", "record 'a', line 2, column 3: non-text byte 0x00 (binary data, not sequence text)"),
    "nul-in-header": (b">a\nAC\n>b\x00c\nAC\n", "record 'a', line 3, column 3: non-text byte 0x00 (binary data, not sequence text) in a header"),
    "high-byte": (b">a\nACG\xe9\n", "record 'a', line 2, column 4: non-text byte 0xe9 (binary data, not sequence text)"),
    "binary-file": (
        b"\x89PNG\r\n\x1a\n\x00\x00",
        "line 1, column 1: non-text byte 0x89 (binary data, not sequence text): not FASTA ('>') or FASTQ ('@') text",
    ),
    "not-fasta": (b"\n# comment\n>a\nAC\n", "line 2, column 1: byte b'#' is not an IUPAC base letter: not FASTA ('>') or FASTQ ('@') text"),
    "zstd": (b"\x28\xb5\x2f\xfd\x00\x00", "zstd-compressed input is not supported (use gzip, bgzip, bz2 or xz)"),
    "fastq-bad-base": (b"@r1\nACGT\n+\nIIII\n@r2\nACXT\n+\nIIII\n", "record 'r2', line 6, column 3: byte b'X' is not an IUPAC base letter"),
    "fastq-no-plus": (b"@r1\nACGT\n@r2\nAC\n+\nII\n", "record 'r1', line 3, column 1: FASTQ record has no '+' line and quality (a new '@' header follows its sequence)"),
    "fastq-short-quality": (b"@r1\nACGT\n+\nIII\n@r2\nAC\n+\nII\n", "record 'r1', line 4: quality has 3 characters, the sequence 4 bases"),
    # a short quality used to take the next record (header, sequence, '+', quality) as its rest: one record, no error
    "fastq-short-quality-swallows": (b"@a\nACGTACGT\n+\nI\n@b\nGG\n+\nII\n", "record 'a', line 4: quality has 1 characters, the sequence 8 bases"),
    "fastq-long-quality": (b"@r1\nACGT\n+\nIIIII\n", "record 'r1', line 4: quality has more characters (5) than the sequence has bases (4)"),
    "fastq-bad-quality": (b"@r1\nACG\n+\nI I\n", "record 'r1', line 4, column 2: byte b' ' is no FASTQ quality character ('!'..'~')"),
    "fastq-plus-mismatch": (b"@r1\nAC\n+r2\nII\n", "record 'r1', line 3, column 2: the '+' line neither is empty nor repeats the header"),
    "fastq-no-at": (b"@r1\nAC\n+\nII\n\nr2\nAC\n", "record 'r1', line 6, column 1: expected a FASTQ '@' header line"),
    "fastq-truncated": (b"@r1\nAC\n+\nII\n@r2\nACGT\n+\nII", "record 'r2', line 8: the file ends inside a FASTQ record (missing quality; truncated?)"),
    "fastq-truncated-no-plus": (b"@r1\nACGT\r\n", "record 'r1', line 2: the file ends inside a FASTQ record (missing '+' line and quality; truncated?)"),
    "fastq-nul-header": (b"@r1\nA\n+\nI\n@r\x002\nA\n+\nI\n", "record 'r1', line 5, column 3: non-text byte 0x00 (binary data, not sequence text) in a header"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_malformed_input_names_file_record_line(tmp_path, case, block_size):
    text, message = MALFORMED[case]
    path = tmp_path / f"{case}.txt"
    path.write_bytes(text)
    with pytest.raises(FastaFormatError) as info:
        list(read_fasta(path, block_size=block_size))
    assert str(info.value) == f"{path}: {message}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("block_size,n_lines", [(1, 400), (4096, 9000), (DEFAULT_BLOCK_SIZE, 9000)])
def test_error_line_deep_in_a_large_file(tmp_path, block_size, n_lines):
    """Line numbers stay exact when the error lies many blocks into the file (newlines counted per block)."""
    rng = np.random.default_rng(7)
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=(n_lines, 61))]
    lines = [">chr1 first"] + [row.tobytes().decode() for row in bases]
    lines[n_lines // 2] = ">chr2"
    bad_line = n_lines * 4 // 5  # 0-based
    lines[bad_line] = lines[bad_line][:12] + "Z" + lines[bad_line][13:]
    path = tmp_path / "deep.fa"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    expected = f"record 'chr2', line {bad_line + 1}, column 13: byte b'Z' is not an IUPAC base letter"
    with pytest.raises(FastaFormatError) as info:
        list(read_fasta(path, block_size=block_size))
    assert str(info.value) == f"{path}: {expected}"


def _prefix_state(prefix: bytes) -> tuple[str | None, list[str], int]:
    """For decodable data `prefix`: the record being read where it ends (that of the last header
    line complete in it), the records before that one, and the line where it ends (1-based)."""
    complete = prefix[: prefix.rfind(b"\n") + 1]
    names = [rec[0] for rec in ref_parse_fasta(complete)]
    return (names[-1] if names else None), names[:-1], prefix.count(b"\n") + 1


DECOMPRESSORS = {
    "gzip": (gzip.compress, lambda: zlib.decompressobj(31)),
    "xz": (lzma.compress, lzma.LZMADecompressor),
    "bz2": (bz2.compress, bz2.BZ2Decompressor),
}


@pytest.mark.parametrize("kind", list(DECOMPRESSORS))
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_truncated_stream_names_record_and_line(tmp_path, kind, fraction):
    """A cut compressed file: the records before the damage are yielded, then an error at the line
    where the decodable data ends, naming the record in progress; the cut record is not yielded."""
    rng = np.random.default_rng(_seed(kind, fraction))
    truth = [(f"r{i}", f"r{i}", "".join(rng.choice(list("ACGT"), size=300))) for i in range(40)]
    text = "".join(f">{d}\n" + "\n".join(s[j : j + 70] for j in range(0, 300, 70)) + "\n" for _, d, s in truth).encode()
    compress, decompressor = DECOMPRESSORS[kind]
    blob = compress(text)
    cut = blob[: int(len(blob) * fraction)]
    prefix = decompressor().decompress(cut)
    assert len(prefix) < len(text)
    current, done, line = _prefix_state(prefix)
    path = tmp_path / f"cut.fa.{kind}"
    path.write_bytes(cut)
    for block_size in [1, 100, DEFAULT_BLOCK_SIZE]:
        got = []
        with pytest.raises(FastaFormatError) as info:
            for rec in read_fasta(path, block_size=block_size):
                got.append(rec.name)
        where = f"record {current!r}, line {line}" if current is not None else f"line {line}"
        assert str(info.value).startswith(f"{path}: {where}: truncated or corrupt compressed stream ("), (block_size, str(info.value))
        assert got == done


def test_corrupt_gzip(tmp_path):
    text = b"".join(b">r%d\n" % i + b"ACGTTGCA" * 40 + b"\n" for i in range(200))
    blob = bytearray(gzip.compress(text))
    blob[-8] ^= 0xFF  # CRC of the member
    path = tmp_path / "crc.fa.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(FastaFormatError, match=rf"^{path}: record 'r199', line 401: truncated or corrupt compressed stream \(CRC check failed"):
        list(read_fasta(path))
    blob = bytearray(gzip.compress(text))
    blob[len(blob) // 2 : len(blob) // 2 + 16] = b"\xff" * 16  # damaged deflate data
    path.write_bytes(bytes(blob))
    # zlib may notice the damage, or the garbage it inflates may first fail as a sequence byte
    bad = r"(truncated or corrupt compressed stream|byte .* is not an IUPAC base letter|non-text byte)"
    with pytest.raises(FastaFormatError, match=rf"^{path}: record 'r\d+', line \d+(, column \d+)?: {bad}"):
        list(read_fasta(path))


def test_missing_file_is_not_a_format_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_fasta(tmp_path / "absent.fa"))
    with pytest.raises(ValueError, match="block_size"):
        list(read_fasta(bundled_fasta(), block_size=0))


@pytest.mark.parametrize("fraction", [0.3, 0.8])
def test_truncated_fastq_names_record_and_line(tmp_path, fraction):
    rng = np.random.default_rng(_seed("fastq-cut", fraction))
    seqs = ["".join(rng.choice(list("ACGT"), size=50)) for _ in range(60)]
    text = "".join(f"@q{i}\n{s}\n+\n{'I' * 50}\n" for i, s in enumerate(seqs)).encode()
    blob = gzip.compress(text)
    cut = blob[: int(len(blob) * fraction)]
    prefix = zlib.decompressobj(31).decompress(cut)
    complete = prefix[: prefix.rfind(b"\n") + 1].decode().splitlines()
    current = [line[1:] for line in complete if line.startswith("@")][-1]
    path = tmp_path / "cut.fq.gz"
    path.write_bytes(cut)
    for block_size in [1, 100, DEFAULT_BLOCK_SIZE]:
        with pytest.raises(FastaFormatError) as info:
            list(read_fasta(path, block_size=block_size))
        line = prefix.count(b"\n") + 1
        assert str(info.value).startswith(f"{path}: record {current!r}, line {line}: truncated or corrupt compressed stream (")
