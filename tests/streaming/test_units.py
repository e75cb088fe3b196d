"""Work units (vqdna.streaming.units): every record's bases, names and halos reach exactly one unit
each, whatever the cut; the plan rank 0 broadcasts gives every rank exactly the units a full pass
cuts; planning a plain FASTA file reads O(1) bytes and a unit reads only its own byte range."""

import builtins
import gzip
import os
import time

import numpy as np
import pytest

from tests.streaming._fixtures import random_fasta
from vqdna.data import read_fasta
from vqdna.streaming import units as units_mod
from vqdna.streaming.token_files import link_shards
from vqdna.streaming.units import plan_units, planned_units, work_units

LENGTHS = [0, 1, 5, 9, 63, 64, 65, 200, 0, 1301, 3, 17]
MARGIN = 14


def _write(path, lengths, seed, fastq=False, gz=False, width=60, newline="\n"):
    rng = np.random.default_rng(seed)
    lines = []
    for i, n in enumerate(lengths):
        seq = np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, n)].tobytes().decode()
        if fastq:
            lines += [f"@f{seed}r{i}", seq, "+", "I" * n]
        else:
            lines.append(f">f{seed}r{i} d")
            lines.extend(seq[j : j + width] for j in range(0, n, width))
    data = (newline.join(lines) + newline).encode()
    (gzip.open if gz else open)(path, "wb").write(data)
    return str(path)


def linked(units):
    """Each unit's pieces as the finished directory gives them: (ordinal, name, start, length, record
    length) per piece, from the units' shard-local values completed like the manifest (link_shards)."""
    entries, summaries = [], []
    for u in units:
        p, n = u.pieces, len(u.pieces)
        entries.append({"name": str(u.index)})
        summaries.append({
            "pieces": n, "records": int((p.ordinals >= 0).sum()), "continues": bool(n and p.ordinals[0] == -1),
            "first_length": int(p.lengths[0]) if n else 0, "last_length": int(p.lengths[-1]) if n else 0,
            "last_name": p.name(n - 1) if n else "",
        })
    records = link_shards(entries, summaries)
    out = []
    for u, e in zip(units, entries):
        pieces = []
        for j, piece in enumerate(u.pieces):
            name, start, record_length = piece.name, 0, piece.length
            if j == 0 and "continued" in e:
                name, start, record_length = (e["continued"][k] for k in ("name", "start", "record_length"))
            if j == len(u.pieces) - 1 and "last_record_length" in e:
                record_length = e["last_record_length"]
            pieces.append((piece.ordinal + e["records_before"], name, start, piece.length, record_length))
        out.append(pieces)
    return out, records


def _check_cover(paths, units, margin=MARGIN):
    """Every record of `paths` (read_fasta) is tiled by its pieces in order, names and lengths right,
    and each piece's unit holds its bases with up to `margin` bases of halo each side, clipped at the
    record's ends exactly as in the whole record."""
    records = [(r.name, r.ids) for p in paths for r in read_fasta(p)]
    pieces, count = linked(units)
    assert count == len(records)
    covered = [0] * len(records)
    for u, unit_pieces in zip(units, pieces):
        for j, (ordinal, name, start, length, record_length) in enumerate(unit_pieces):
            want_name, ids = records[ordinal]
            assert (name, record_length, start) == (want_name, len(ids), covered[ordinal]), (u.index, j)
            covered[ordinal] += length
            lo, hi = max(0, start - margin), min(len(ids), start + length + margin)
            pack_start, seq_start = int(u.starts[j]), int(u.seq_starts[j])
            assert pack_start - seq_start == start - lo, (u.index, j)  # the halo before, clipped alike
            assert min(int(u.record_lengths[j]) - pack_start - length, margin) == hi - start - length, (u.index, j)
            np.testing.assert_array_equal(u.seq[int(u.seq_offsets[j]) :][: hi - lo], ids[lo:hi])
    assert covered == [len(ids) for _, ids in records]


def _texts(rng):
    def seq(n):
        return np.frombuffer(b"ACGTNacgt", np.uint8)[rng.integers(0, 9, n)].tobytes()

    return {
        "single-line": b"".join(b">r%d x\n" % i + seq(n) + b"\n" for i, n in enumerate([300, 0, 1, 2, 2000, 3, 0])),
        "crlf-blank": b"\r\n\r\n" + b"".join(
            b"> r%d\tdesc\r\n" % i + b"\r\n".join(seq(n)[k : k + 7] for k in range(0, n, 7)) + b"\r\n\r\n"
            for i, n in enumerate([30, 1, 0, 90, 2])),
        "no-final-newline": b">a\nACGT\n>b\n" + seq(50) + b"\n>c",
        "empty-names": b">\nAC\n>\n\n>x y\nA\nC\nG\n",
    }


@pytest.mark.parametrize("text", ["single-line", "crlf-blank", "no-final-newline", "empty-names"])
@pytest.mark.parametrize("limits", [(1, 1), (7, 2), (64, 3), (5000, 1000)])
def test_byte_range_units_cover_every_record_with_its_halo(tmp_path, text, limits):
    """Plain FASTA byte ranges of any size (1 byte: most ranges fall inside a header or between two
    bases of one line) give every base, name and halo exactly once, as the whole record has them."""
    path = tmp_path / "in.fa"
    path.write_bytes(_texts(np.random.default_rng(5))[text])
    _check_cover([str(path)], list(work_units([str(path)], *limits, margin=MARGIN)))


def test_a_unit_parsed_in_small_blocks_is_the_same(tmp_path, monkeypatch):
    """A unit's bytes are parsed in read_fasta's blocks: headers and lines spanning blocks change nothing."""
    path = tmp_path / "in.fa"
    texts = _texts(np.random.default_rng(5))
    path.write_bytes(texts["crlf-blank"] + texts["single-line"])
    want = list(work_units([str(path)], 64, 3, margin=MARGIN))
    monkeypatch.setattr(units_mod, "DEFAULT_BLOCK_SIZE", 3)
    got = list(work_units([str(path)], 64, 3, margin=MARGIN))
    _check_cover([str(path)], got)
    assert [u.pieces for u in got] == [u.pieces for u in want]


def test_a_line_longer_than_any_header_is_read_as_sequence(tmp_path, monkeypatch):
    """Inside a line whose start is more than MAX_HEADER_BYTES back, a unit does not look for the line's
    start (a single-line genome costs a bounded read per unit); a longer header crossing a unit's end is
    refused, naming the file and line."""
    monkeypatch.setattr(units_mod, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "in.fa"
    path.write_bytes(_texts(np.random.default_rng(5))["single-line"])
    _check_cover([str(path)], list(work_units([str(path)], 7, 2, margin=MARGIN)))
    path.write_bytes(b">short\nACGT\n>" + b"h" * 100 + b"\nACGT\n")
    with pytest.raises(ValueError, match=r"in\.fa: line 3: a header line longer than 64 bytes"):
        list(work_units([str(path)], 30, 1000))


@pytest.mark.parametrize("shard_bases", [30, 100, 1000])
def test_a_bad_byte_is_named_alike_whatever_the_cut(tmp_path, shard_bases):
    """A bad byte in a record continuing from an earlier unit (whose header the unit never reads), in
    its halo, or in a unit's own records gives read_fasta's message: file, record, line, column."""
    path = tmp_path / "bad.fa"
    path.write_bytes(b">a x\nACGT\n>long y\n" + b"ACGTACGTAC\n" * 20 + b"ACGXACGTAC\n" + b"ACGTACGTAC\n" * 5)
    with pytest.raises(ValueError, match=r"bad\.fa: record 'long', line 24, column 4: byte b'X' is not an IUPAC base letter"):
        list(work_units([str(path)], shard_bases, 1000, margin=MARGIN))


@pytest.mark.parametrize("kind", ["plain", "gzip", "fastq", "mixed", "crlf"])
@pytest.mark.parametrize("limits", [(100, 4), (250, 1000), (7, 2)])
def test_planned_units_equal_the_full_pass(tmp_path, kind, limits):
    """Any subset of units built from the plan equals the same units of work_units (margin included),
    over several files, inside a long record, over gzip and FASTQ (greedy units); and they cover the
    records."""
    if kind == "mixed":
        paths = [_write(tmp_path / "a.fa", LENGTHS, 1), _write(tmp_path / "b.fq", LENGTHS[:5], 2, fastq=True),
                 _write(tmp_path / "c.fa.gz", LENGTHS[::-1], 3, gz=True)]
    else:
        kw = dict(fastq=kind == "fastq", gz=kind == "gzip", newline="\r\n" if kind == "crlf" else "\n")
        paths = [_write(tmp_path / "a", LENGTHS, 1, **kw), _write(tmp_path / "b", LENGTHS[3:], 2, **kw)]
    full = list(work_units(paths, *limits, margin=MARGIN))
    _check_cover(paths, full)
    plan = plan_units(paths, *limits)
    assert len(plan) == len(full) > 3
    for wanted in (range(len(full)), range(1, len(full), 2), range(0, len(full), 3), [len(full) - 1]):
        got = list(planned_units(paths, plan, list(wanted), *limits, margin=MARGIN))
        assert [u.index for u in got] == list(wanted)
        for a in got:
            b = full[a.index]
            assert a.pieces == b.pieces
            for field in ("seq", "seq_starts", "seq_offsets", "starts", "record_lengths"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


class _Counting:
    """builtins.open for the units module that counts the bytes read through it."""

    def __init__(self):
        self.read = 0

    def __call__(self, *args, **kw):
        f = builtins.open(*args, **kw)
        outer, real = self, f.read

        def read(n=-1):
            data = real(n)
            outer.read += len(data)
            return data

        f.read = read
        return f


def _big_fasta(path, records, length=8):
    """`records` records of `length` bases (bench/scale.py's layout: >r<i>, one sequence line)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, records, 1 << 16):
            n = min(1 << 16, records - start)
            seqs = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (n, length))]
            rows = [b">r%d\n%s\n" % (start + i, s.tobytes()) for i, s in enumerate(seqs)]
            f.write(b"".join(rows))
    return str(path)


def test_planning_a_plain_fasta_reads_its_first_mib_only(tmp_path, monkeypatch):
    """plan_units reads a plain FASTA file's first SAMPLE_BYTES (for its unit size), not its records:
    no scan (fasta_record_lengths) and no decoding (read_fasta), O(1) bytes per file; planning it
    before format 4 scanned every byte. A unit reads its own range and a few bytes around it."""
    path = _big_fasta(tmp_path / "a.fa", 300_000)  # about 5 MB
    monkeypatch.setattr(units_mod, "SAMPLE_BYTES", 1 << 16)
    for name in ("fasta_record_lengths", "read_fasta"):
        monkeypatch.setattr(units_mod, name, lambda *a, **k: pytest.fail("planning read the records"))
    counting = _Counting()
    monkeypatch.setattr(units_mod, "open", counting, raising=False)
    plan = plan_units([path], 1 << 20, 1 << 14)  # short records: units of about 2**14 records
    assert counting.read <= 1 << 16 and len(plan) > 10
    unit_bytes = plan.files[0].unit_bytes
    counting.read = 0
    units = list(planned_units([path], plan, [3, 7], 1 << 20, 1 << 14, margin=MARGIN))
    assert counting.read <= 2 * unit_bytes + (1 << 16)  # two ranges, the scans around their ends
    assert [u.index for u in units] == [3, 7] and all(abs(len(u.pieces) - (1 << 14)) < 1 << 12 for u in units)


@pytest.mark.slow
def test_planning_100_mb_is_o_files(tmp_path):
    """Planning a ~100 MB plain FASTA (5.5 M records of 8 bases) reads its first MiB and takes
    milliseconds (rank 0 scanned all of it before format 4: about 1 s per 100 MB). Bytes counted by the
    kernel (/proc/self/io rchar: every read of this process)."""
    from bench.scale import _read_bytes

    if _read_bytes() < 0:
        pytest.skip("no /proc/self/io")
    path = _big_fasta(tmp_path / "big.fa", 5_500_000)
    assert os.path.getsize(path) > 90e6
    before, t0 = _read_bytes(), time.perf_counter()
    plan = plan_units([path], 1 << 26, 1 << 20)
    seconds, read = time.perf_counter() - t0, _read_bytes() - before
    assert read <= units_mod.SAMPLE_BYTES + (1 << 16) and seconds < 0.2 and len(plan) >= 5


def test_work_units_are_deterministic(tmp_path):
    fasta = random_fasta(tmp_path / "in.fa", LENGTHS)
    units = list(work_units([fasta], 100, 4))
    again = list(work_units([fasta], 100, 4))
    assert [u.pieces for u in units] == [u.pieces for u in again]
    # A byte range of shard_bases bytes holds at most one base more (a record's first base stays with
    # its header); pieces tile every record exactly once, in input order.
    assert all(u.bases <= 101 for u in units)
    covered = {}
    for pieces in linked(units)[0]:
        for ordinal, _, start, length, _ in pieces:
            assert covered.get(ordinal, 0) == start
            covered[ordinal] = start + length
    assert [covered[i] for i in range(len(LENGTHS))] == LENGTHS
