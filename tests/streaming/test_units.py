"""Work units (vqdna.streaming.units): the plan rank 0 broadcasts under torch.distributed gives every
rank exactly the units a full pass cuts, reading only from each unit's first record on."""

import gzip

import numpy as np
import pytest

from vqdna.streaming import units as units_mod
from vqdna.streaming.units import plan_units, planned_units, work_units

LENGTHS = [0, 1, 5, 9, 63, 64, 65, 200, 0, 1301, 3, 17]


def _write(path, lengths, seed, fastq=False, gz=False):
    rng = np.random.default_rng(seed)
    lines = []
    for i, n in enumerate(lengths):
        seq = np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, n)].tobytes().decode()
        if fastq:
            lines += [f"@f{seed}r{i}", seq, "+", "I" * n]
        else:
            lines.append(f">f{seed}r{i} d")
            lines.extend(seq[j : j + 60] for j in range(0, n, 60))
    data = ("\n".join(lines) + "\n").encode()
    (gzip.open if gz else open)(path, "wb").write(data)
    return str(path)


def _same(a, b):
    assert a.index == b.index and a.pieces == b.pieces
    for field in ("seq", "seq_starts", "seq_offsets"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("kind", ["plain", "gzip", "fastq", "mixed"])
@pytest.mark.parametrize("limits", [(100, 4), (250, 1000), (7, 2)])
def test_planned_units_equal_the_full_pass(tmp_path, kind, limits):
    """Any subset of units built from the plan equals the same units of work_units (margin included),
    across file boundaries, inside a long record, over gzip and FASTQ (read from the file's start)."""
    if kind == "mixed":
        paths = [_write(tmp_path / "a.fa", LENGTHS, 1), _write(tmp_path / "b.fq", LENGTHS[:5], 2, fastq=True),
                 _write(tmp_path / "c.fa.gz", LENGTHS[::-1], 3, gz=True)]
    else:
        paths = [_write(tmp_path / "a", LENGTHS, 1, fastq=kind == "fastq", gz=kind == "gzip"),
                 _write(tmp_path / "b", LENGTHS[3:], 2, fastq=kind == "fastq", gz=kind == "gzip")]
    shard_bases, shard_records = limits
    full = list(work_units(paths, shard_bases, shard_records, margin=14))
    plan = plan_units(paths, shard_bases, shard_records)
    assert len(plan) == len(full) > 3
    for u, s in zip(full, plan):
        assert (s.ordinal, s.start) == (int(u.pieces.ordinals[0]), int(u.pieces.starts[0]))
    for wanted in (range(len(full)), range(1, len(full), 2), range(0, len(full), 3), [len(full) - 1]):
        got = list(planned_units(paths, plan, list(wanted), shard_bases, shard_records, margin=14))
        assert [u.index for u in got] == list(wanted)
        for a in got:
            _same(a, full[a.index])


def test_a_rank_reads_only_its_units_records(tmp_path, monkeypatch):
    """planned_units reads (decodes) the records of the wanted units only, not those before them."""
    paths = [_write(tmp_path / "a.fa", [10] * 40, 1)]
    plan = plan_units(paths, 30, 1000)  # 3 records per unit: 14 units (the last has 1)
    read = []
    real = units_mod.read_fasta

    def counting(path, **kw):
        for rec in real(path, **kw):
            read.append(rec.name)
            yield rec

    monkeypatch.setattr(units_mod, "read_fasta", counting)
    got = list(planned_units(paths, plan, [5, 11], 30, 1000))
    assert [u.index for u in got] == [5, 11]
    assert read == [f"f1r{i}" for i in (15, 16, 17, 33, 34, 35)]


def test_planning_a_fasta_input_decodes_no_record(tmp_path, monkeypatch):
    """plan_units scans FASTA inputs for offsets and base counts (fasta_record_lengths) and never decodes
    a record (read_fasta, per-record Python: the O(bases) cost rank 0 paid before every run); FASTQ
    inputs, which have no offsets to seek to, are still read."""
    fasta, fastq = _write(tmp_path / "a.fa", LENGTHS * 5, 1), _write(tmp_path / "b.fq", LENGTHS, 2, fastq=True)
    want = plan_units([fasta, fastq], 100, 4)
    read = []
    real = units_mod.read_fasta

    def watched(path, **kw):
        read.append(path)
        return real(path, **kw)

    monkeypatch.setattr(units_mod, "read_fasta", watched)
    assert plan_units([fasta, fastq], 100, 4) == want and read == [fastq]
    full = list(work_units([fasta, fastq], 100, 4))
    assert [(s.ordinal, s.start) for s in want] == [(int(u.pieces.ordinals[0]), int(u.pieces.starts[0])) for u in full]
