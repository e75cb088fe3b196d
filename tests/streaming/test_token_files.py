"""The token-file format's name index (vqdna.streaming.token_files, format 3): FNV-1a 64 hashes of the
names, sorted, with their pieces, in each .idx trailer; TokenDataset.find() searches it (no scan, no
table built), returns the first record of a name, survives hash collisions; a damaged index is
refused naming the file; format 1 and 2 directories still find by name. Format 4 reads back like
format 3, and its manifest is what completes records split across shards."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.data.test_tokens import _records, _write
from tests.streaming._fixtures import LENGTHS, model, one_thread, random_fasta  # noqa: F401 (fixtures)
from vqdna.data import TokenDataset
from vqdna.streaming import token_files, tokenize_files
from vqdna.streaming.token_files import TokenFileError, name_hash, name_hashes, read_shard_index

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")


def _fnv1a(data: bytes) -> int:
    """FNV-1a 64, the definition (one byte at a time)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


def test_name_hashes_are_fnv1a():
    names = ["", "a", "chr1", "rec4 é", "x" * 300, "NC_000913.3", "a"]
    raw = [n.encode("utf-8") for n in names]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in raw])])
    got = name_hashes(b"".join(raw), offsets)
    assert got.dtype == np.uint64 and got.tolist() == [_fnv1a(b) for b in raw]
    assert [name_hash(n) for n in names] == [_fnv1a(b) for b in raw]
    assert _fnv1a(b"a") == 0xAF63DC4C8601EC8C  # the published FNV-1a 64 test vector


def _dup_records(rng):
    """Records with repeated names (the first of each must be found) and one split over shards."""
    records = _records(rng, 2, (64, 512))
    names = ["a", "b", "a", "c", "b", "long", "a", "d", "e", "c"]
    return [(n, codes) for n, (_, codes) in zip(names, records)]


@pytest.mark.parametrize("shard_bases", [41, 10**6])
def test_find_uses_the_name_index(tmp_path, shard_bases):
    records = _dup_records(np.random.default_rng(0))
    _write(tmp_path, records, (64, 512), shard_bases)
    ds = TokenDataset(tmp_path)
    for i, (name, _) in enumerate(records):
        assert ds.find(name) == [n for n, _ in records].index(name)
    with pytest.raises(KeyError, match="no record named 'zz'"):
        ds.find("zz")
    assert ds._names is None  # nothing was built: every find was a search of the on-disk index
    idx = read_shard_index(str(tmp_path / "shard-00000.idx"))
    assert idx.name_hashes is not None and (np.diff(idx.name_hashes.astype(np.float64)) >= 0).all()


def test_find_survives_hash_collisions(tmp_path, monkeypatch):
    """Every name hashing alike: the index still finds each first record by comparing names."""
    monkeypatch.setattr(token_files, "name_hashes", lambda names, offsets: np.zeros(len(offsets) - 1, np.uint64))
    monkeypatch.setattr(token_files, "name_hash", lambda name: 0)
    records = _dup_records(np.random.default_rng(1))
    _write(tmp_path, records, (64, 512), 41)
    ds = TokenDataset(tmp_path)
    for name in ("a", "b", "c", "long", "d", "e"):
        assert ds.find(name) == [n for n, _ in records].index(name)
    with pytest.raises(KeyError):
        ds.find("zz")


def test_damaged_name_index_is_refused_naming_the_file(tmp_path):
    records = _dup_records(np.random.default_rng(2))
    _write(tmp_path, records, (64, 512), 10**6)
    path = tmp_path / "shard-00000.idx"
    idx = read_shard_index(str(path))
    n = len(idx)
    raw = bytearray(path.read_bytes())
    table = len(raw) - 40 - 16 * n  # the sorted hashes, then their pieces, then the checks
    raw[table : table + 8], raw[table + 8 : table + 16] = raw[table + 8 : table + 16], raw[table : table + 8]
    if bytes(raw) == path.read_bytes():  # equal first hashes: break the order of the pieces instead
        raw[table + 8 * n : table + 8 * n + 8] = (n + 5).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(TokenFileError, match=f"{path}: not a vqdna shard index \\(its name index"):
        TokenDataset(tmp_path)


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_find_by_name(version):
    ds = TokenDataset(os.path.join(FIXTURES, f"tokens-v{version}"), verify=True)
    assert ds.manifest["format_version"] == version
    assert all(s.name_hashes is None for s in ds._shards)
    assert [ds.find(f"r{i}") for i in range(5)] == list(range(5))


def test_format_4_reads_like_format_3(tmp_path, model):
    """The same input, tokenizer and settings in format 4 (byte-range units, shard-local numbers the
    manifest completes) read back exactly like the format 3 directory main's code wrote
    (tests/data/fixtures/tokens-v3): every record's name, length, codes and `find`; each record's
    pieces tile it (starts and record lengths completed), though the cut differs."""
    from vqdna.streaming.token_files import open_shards

    fixtures = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
    v3 = TokenDataset(os.path.join(fixtures, "tokens-v3"), verify=True)
    assert v3.manifest["format_version"] == 3
    inputs = [random_fasta(tmp_path / "in.fa"), random_fasta(tmp_path / "in2.fa.gz", LENGTHS[::-1], seed=1, gz=True)]
    out = str(tmp_path / "v4")
    tokenize_files(inputs, out, model, window=50, batch_size=4, shard_bases=300)
    v4 = TokenDataset(out, verify=True)
    assert v4.manifest["format_version"] == 4 and v4.manifest["shards"] != v3.manifest["shards"]
    assert len(v4) == len(v3) == 2 * len(LENGTHS) and v4.lengths.tolist() == v3.lengths.tolist()
    for i in range(len(v3)):
        assert v4.name(i) == v3.name(i) and v4.find(v3.name(i)) == v3.find(v3.name(i)) == i % len(LENGTHS)
        np.testing.assert_array_equal(v4[i][1], v3[i][1])
    covered = {}
    for idx in open_shards(out, v4.manifest):
        for j in range(len(idx)):
            o = int(idx.ordinals[j])
            assert (idx.name(j), int(idx.record_lengths[j]), int(idx.starts[j])) == (v3.name(o), v3.lengths[o], covered.get(o, 0))
            covered[o] = covered.get(o, 0) + idx.length(j)
    assert [covered[i] for i in range(len(v3))] == v3.lengths.tolist()
    assert sum(1 for e in v4.manifest["shards"] if "continued" in e) > 3  # records split across shards
    # The manifest is what completes the shards: one that lost a split record's entry is refused.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    k = next(k for k, e in enumerate(manifest["shards"]) if "continued" in e)
    del manifest["shards"][k]["continued"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenFileError, match=f"shard-{k:05d}.idx: its first piece continues a record of an earlier shard, the manifest says it does not"):
        TokenDataset(str(broken))
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    manifest["shards"][k]["continued"]["start"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenFileError, match=f"shard-{k:05d}.idx: its first piece does not go on where its record's previous piece ended"):
        TokenDataset(str(broken))
