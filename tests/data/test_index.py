"""SequenceIndex: records and windows equal read_fasta's, reuse vs rebuild on changed inputs, atomic
writes (a failed build leaves nothing that looks like an index), and window sampling."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

import vqdna.data.index as index_module
from vqdna.data import PAD, FastaFormatError, SequenceIndex, bundled_fasta, read_fasta


def _inputs(tmp_path):
    """A gzip FASTA with short and empty records, a FASTQ, and the real yeast ORFs fixture."""
    rng = np.random.default_rng(3)
    fasta = tmp_path / "a.fa.gz"
    recs = [("chrA", 500), ("empty", 0), ("tiny", 3), ("chrB", 1234)]
    text = "".join(f">{n} d\n" + "".join(rng.choice(list("ACGTNacgtu"), size=k)) + "\n" for n, k in recs)
    fasta.write_bytes(gzip.compress(text.encode()))
    fastq = tmp_path / "b.fq"
    fastq.write_bytes(b"@read1\nACGTACGTAA\n+\nIIIIIIIIII\n@chrA dup\nGGGG\n+\nIIII\n")
    yeast = tmp_path / "yeast.fa.gz"
    shutil.copy(bundled_fasta("yeast_orfs.fa.gz"), yeast)
    return [fasta, fastq, yeast]


def test_records_and_windows_equal_read_fasta(tmp_path):
    paths = _inputs(tmp_path)
    idx = SequenceIndex.build(paths, cache=tmp_path / "cache")
    expected = [(os.path.realpath(p), r) for p in paths for r in read_fasta(p)]
    assert len(idx) == len(expected) and idx.total == sum(len(r.ids) for _, r in expected)
    rng = np.random.default_rng(0)
    for i, (rec, (path, truth)) in enumerate(zip(idx.records, expected)):
        assert (rec.file, rec.name, rec.description, rec.length) == (path, truth.name, truth.description, len(truth.ids))
        np.testing.assert_array_equal(idx.sequence(i), truth.ids)
        for _ in range(5):
            start = int(rng.integers(0, len(truth.ids) + 1))
            length = int(rng.integers(0, len(truth.ids) - start + 1))
            np.testing.assert_array_equal(idx.window(i, start, length), truth.ids[start : start + length])
    np.testing.assert_array_equal(idx.window("chrB", 10, 5), expected[3][1].ids[10:15])
    assert idx.window("empty", 0, 0).shape == (0,)
    # the same index opened from its directory
    again = SequenceIndex.open(idx.directory)
    assert again.records == idx.records and again.is_current()


def test_bad_requests(tmp_path):
    idx = SequenceIndex.build(_inputs(tmp_path), cache=tmp_path / "cache")
    with pytest.raises(KeyError, match="'chrA' is used 2 times"):
        idx.window("chrA", 0, 1)
    with pytest.raises(KeyError, match="no record named 'nope'"):
        idx.window("nope", 0, 1)
    with pytest.raises(IndexError, match=r"window \[498, 502\) is outside record 'chrA' \(#0, 500 bases\)"):
        idx.window(0, 498, 4)
    with pytest.raises(IndexError, match="out of range"):
        idx.window(len(idx), 0, 1)
    with pytest.raises(IndexError):
        idx.window(0, -1, 2)


def test_reused_when_unchanged_rebuilt_when_changed(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    cache = tmp_path / "cache"
    first = SequenceIndex.build(paths, cache=cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an up-to-date index was decoded again")

    with monkeypatch.context() as m:
        m.setattr(index_module, "read_fasta", no_decoding)
        assert SequenceIndex.build(paths, cache=cache).directory == first.directory

    # Same size, same mtime, different content: caught by the hash of the file's ends.
    st = os.stat(paths[1])
    paths[1].write_bytes(paths[1].read_bytes().replace(b"ACGTACGTAA", b"TTTTACGTAA"))
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(paths[1]).st_size == st.st_size and not first.is_current()
    second = SequenceIndex.build(paths, cache=cache)
    assert second.directory != first.directory
    np.testing.assert_array_equal(second.sequence("read1")[:4], [3, 3, 3, 3])
    assert not os.path.exists(first.directory)  # the stale index of the same paths is removed
    # A different size (appended record) also rebuilds.
    with open(paths[1], "ab") as f:
        f.write(b"@new\nAC\n+\nII\n")
    third = SequenceIndex.build(paths, cache=cache)
    assert third.records[-1 - 7].name == "new" and third.directory != second.directory
    assert sorted(os.listdir(cache)) == [os.path.basename(third.directory)]  # no temporaries left


def test_stale_index_is_refused_naming_what_changed(tmp_path):
    """check_current: nothing while the inputs are as decoded; else StaleIndexError naming the index, the
    input and what changed (size, mtime, content of the ends with size and mtime kept, a missing file)."""
    from vqdna.data import StaleIndexError

    paths = _inputs(tmp_path)
    idx = SequenceIndex.build(paths, cache=tmp_path / "cache")
    idx.check_current()
    assert idx.changes() == []
    fq = os.path.realpath(paths[1])
    st = os.stat(fq)
    os.utime(fq, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert idx.changes() == [f"{fq}: mtime changed"]
    paths[1].write_bytes(paths[1].read_bytes().replace(b"ACGTACGTAA", b"TTTTACGTAA"))
    os.utime(fq, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert idx.changes() == [f"{fq}: first/last MiB changed"]
    with open(fq, "ab") as f:
        f.write(b"@new\nAC\n+\nII\n")
    with pytest.raises(StaleIndexError) as err:
        idx.check_current()
    size = os.stat(fq).st_size
    assert str(err.value).startswith(f"the sequence index {idx.directory} is stale")
    assert f"{fq}: size {st.st_size} -> {size} bytes, mtime changed, first/last MiB changed" in str(err.value)
    os.remove(paths[0])
    assert idx.changes()[0].startswith(f"{os.path.realpath(paths[0])}: cannot be read (")
    # same inputs, decoded with another byte table (an older vqdna): stale too, though no file changed
    fresh = SequenceIndex.build(paths[1:], cache=tmp_path / "cache2")
    fresh.key = "0" * 64
    with pytest.raises(StaleIndexError, match="another vqdna-sequence-index version or byte table"):
        fresh.check_current()


def test_failed_build_leaves_no_index(tmp_path):
    paths = _inputs(tmp_path)
    bad = tmp_path / "bad.fa"
    bad.write_bytes(b">ok\nACGT\n>broken\nACGT\nAC!T\n")
    cache = tmp_path / "cache"
    with pytest.raises(FastaFormatError, match=r"bad\.fa: record 'broken', line 5, column 3"):
        SequenceIndex.build(paths + [bad], cache=cache)
    assert os.listdir(cache) == []  # neither a final nor a temporary directory
    bad.write_bytes(b">ok\nACGT\n")
    assert SequenceIndex.build(paths + [bad], cache=cache).records[-1].name == "ok"


def test_incomplete_index_is_refused(tmp_path):
    idx = SequenceIndex.build(_inputs(tmp_path), cache=tmp_path / "cache")
    seq = os.path.join(idx.directory, "sequence.u8")
    with open(seq, "r+b") as f:
        f.truncate(idx.total - 1)
    with pytest.raises(ValueError, match="corrupt or incomplete index"):
        SequenceIndex.open(idx.directory)
    with pytest.raises(FileNotFoundError, match="no sequence index here"):
        SequenceIndex.open(tmp_path)


def test_sample_windows(tmp_path):
    idx = SequenceIndex.build(_inputs(tmp_path), cache=tmp_path / "cache")
    w = idx.sample_windows(4000, 64, rng=1)
    assert w.ids.shape == (4000, 64) and w.ids.dtype == np.uint8 and w.ids.flags.writeable
    lengths = idx.lengths[w.record]
    assert (lengths > 0).all()  # empty records never drawn
    np.testing.assert_array_equal(w.valid, np.minimum(lengths, 64))
    assert (w.start >= 0).all() and (w.start + w.valid <= lengths).all()
    for k in range(0, 4000, 7):  # every window is the record's slice, then padding
        v = w.valid[k]
        np.testing.assert_array_equal(w.ids[k, :v], idx.window(int(w.record[k]), int(w.start[k]), int(v)))
        assert (w.ids[k, v:] == PAD).all()
    # records drawn in proportion to their length (uniform over bases): a loose binomial check
    frac = np.bincount(w.record, minlength=len(idx)) / 4000
    expect = idx.lengths / idx.total
    assert np.all(np.abs(frac - expect) < 4 * np.sqrt(expect * (1 - expect) / 4000) + 1e-3)
    # starts are uniform over the positions that fit, both ends included
    small = tmp_path / "small.fa"
    small.write_bytes(b">short\n" + b"ACGT" * 17 + b"AC\n>tiny\nACG\n")  # 70 and 3 bases
    s = SequenceIndex.build(small, cache=tmp_path / "cache2").sample_windows(7300, 64, rng=2)
    counts = np.bincount(s.start[s.record == 0], minlength=7)
    assert len(counts) == 7 and counts.min() > 0.8 * counts.mean()
    tiny = s.record == 1  # shorter than the window: whole record, start 0, then PAD
    assert 200 < tiny.sum() < 400  # 3 of 73 bases: ~300 of 7300
    assert (s.valid[tiny] == 3).all() and (s.start[tiny] == 0).all()
    assert (s.ids[tiny, :3] == [0, 1, 2]).all() and (s.ids[tiny, 3:] == PAD).all()
    # reproducible from the seed / generator
    np.testing.assert_array_equal(idx.sample_windows(50, 16, rng=np.random.default_rng(5)).ids, idx.sample_windows(50, 16, rng=5).ids)
    assert idx.sample_windows(0, 16, rng=0).ids.shape == (0, 16)
    with pytest.raises(ValueError):
        idx.sample_windows(3, 0)


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.fa"
    empty.write_bytes(b">a\n>b\n")
    idx = SequenceIndex.build(empty, cache=tmp_path / "cache")
    assert idx.total == 0 and [r.name for r in idx.records] == ["a", "b"]
    with pytest.raises(ValueError, match="holds no bases"):
        idx.sample_windows(1, 8)


def test_sample_windows_one_base_records(tmp_path):
    """A record's first base belongs to it: records of one base are drawn as often as any other base (a base
    at a record boundary assigned to the record before would never draw them)."""
    path = tmp_path / "ones.fa"
    path.write_bytes(b">a\nA\n>c\nC\n>g\nG\n>t\nTTTTT\n")
    idx = SequenceIndex.build(path, cache=tmp_path / "cache")
    w = idx.sample_windows(8000, 4, rng=3)
    frac = np.bincount(w.record, minlength=4) / 8000
    np.testing.assert_allclose(frac, [1 / 8, 1 / 8, 1 / 8, 5 / 8], atol=0.03)
    for record, base in enumerate((0, 1, 2, 3)):  # each window holds its own record's bases
        assert (w.ids[w.record == record, 0] == base).all()


def test_sample_windows_min_acgt(tmp_path):
    path = tmp_path / "n.fa"
    path.write_bytes(b">gap\n" + b"N" * 100 + b"ACGT" + b"N" * 100 + b"\n>allN\n" + b"n" * 50 + b"\n")
    idx = SequenceIndex.build(path, cache=tmp_path / "cache")
    w = idx.sample_windows(200, 32, rng=0, min_acgt=2)
    assert ((w.ids < 4).sum(axis=1) >= 2).all() and (w.record == 0).all()
    assert (w.start >= 100 + 2 - 32).all() and (w.start <= 102).all()
    plain = idx.sample_windows(200, 32, rng=0)  # without the filter most windows are all N
    assert ((plain.ids < 4).sum(axis=1) == 0).mean() > 0.5
    with pytest.raises(ValueError, match="no window of 32 with >= 5 A/C/G/T"):
        idx.sample_windows(10, 32, rng=0, min_acgt=5)


def test_concurrent_builders_first_rename_wins(tmp_path, monkeypatch):
    """Another process completes the same index while this one decodes: its copy is kept, ours
    dropped, and no temporary directory remains."""
    paths = _inputs(tmp_path)
    cache = tmp_path / "cache"
    real_rename = os.rename

    def rename_after_a_rival(src, dst):
        shutil.copytree(src, dst)  # the rival's complete index appears first
        real_rename(src, dst)  # ours now fails: the destination is a non-empty directory

    monkeypatch.setattr(index_module.os, "rename", rename_after_a_rival)
    idx = SequenceIndex.build(paths, cache=cache)
    monkeypatch.undo()
    assert os.listdir(cache) == [os.path.basename(idx.directory)]
    assert idx.total == sum(len(r.ids) for p in paths for r in read_fasta(p))
