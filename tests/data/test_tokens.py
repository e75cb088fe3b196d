"""Token files (vqdna.data.tokens reading what vqdna.streaming.token_files writes): writer -> TokenDataset round trip, Megatron MMIDIDX layout,
completeness checks, refusal of incomplete or corrupt directories (open-time structure checks,
checksums with verify=True), safe shard names in the manifest."""

import os
import pickle
import re
import struct

import numpy as np
import pytest

from vqdna.data import TokenDataset
from vqdna.streaming.token_files import (
    FORMAT_VERSION,
    Piece,
    ShardWriter,
    TokenFileError,
    codes_dtype,
    read_manifest,
    read_shard_index,
    shard_complete,
    shard_entry,
    verify_directory,
    write_manifest,
)


def _records(rng, n_levels, sizes):
    """Random records with awkward lengths (0, 1, ...), codes in range per level."""
    lengths = [0, 1, 5, 0, 17, 130, 2, 64, 1000, 3]
    out = []
    for i, n in enumerate(lengths):
        codes = np.stack([rng.integers(0, k, n) for k in sizes], axis=1) if n else np.zeros((0, n_levels), np.int64)
        out.append((f"rec{i} é" if i == 4 else f"rec{i}", codes))
    return out


def _write(directory, records, sizes, shard_bases):
    """Shards of at most shard_bases bases; long records split into pieces like the pipeline does."""
    shards, pieces, chunks, bases = [], [], [], 0

    def flush():
        nonlocal pieces, chunks, bases
        w = ShardWriter(str(directory), len(shards), pieces, sizes)
        for c in chunks:
            w.write(c)
        w.close()
        shards.append(shard_entry(str(directory), len(shards))[0])
        assert shards[-1]["pieces"] == len(pieces) and shards[-1]["bases"] == bases
        pieces, chunks, bases = [], [], 0

    for ordinal, (name, codes) in enumerate(records):
        start = 0
        while True:
            take = min(len(codes) - start, shard_bases - bases)
            pieces.append(Piece(ordinal, name, start, take, len(codes)))
            chunks.append(codes[start : start + take])
            bases, start = bases + take, start + take
            if bases >= shard_bases:
                flush()
            if start >= len(codes):
                break
    if pieces:
        flush()
    manifest = {
        "format": "vqdna-tokens", "format_version": FORMAT_VERSION, "complete": True, "levels": len(sizes),
        "codebook_sizes": list(sizes), "dtype": codes_dtype(sizes), "shards": shards, "records": len(records),
        "bases": sum(len(c) for _, c in records),
    }
    write_manifest(str(directory), manifest)
    return manifest


@pytest.mark.parametrize("sizes", [(64, 512), (7,), (70000, 3, 65536)], ids=["uint16", "one-level", "uint32"])
@pytest.mark.parametrize("shard_bases", [41, 10**6])
def test_round_trip(tmp_path, sizes, shard_bases):
    rng = np.random.default_rng(len(sizes) * 1000 + shard_bases)
    records = _records(rng, len(sizes), sizes)
    manifest = _write(tmp_path, records, sizes, shard_bases)
    ds = TokenDataset(tmp_path)
    assert len(ds) == len(records)
    assert ds.lengths.tolist() == [len(c) for _, c in records]
    assert verify_directory(str(tmp_path)) == [] and len(TokenDataset(tmp_path, verify=True)) == len(records)
    want_dtype = np.uint16 if max(sizes) <= 65536 else np.uint32
    for i, (name, codes) in enumerate(records):
        got_name, got = ds[i]
        assert got_name == name
        assert got.dtype == want_dtype and got.shape == (len(codes), len(sizes))
        np.testing.assert_array_equal(got, codes)
    assert ds[-1][0] == records[-1][0]
    with pytest.raises(IndexError):
        ds[len(records)]
    # A record held in one shard comes back memory-mapped, not copied.
    whole = [i for i in range(len(ds)) if len(ds._pieces(i)) == 1 and ds.lengths[i] > 0]
    assert whole or shard_bases == 1
    for i in whole:
        assert isinstance(ds[i][1].base, np.memmap) or isinstance(ds[i][1], np.memmap)
    assert ds.find("rec4 é") == 4 and ds.find("rec0") == 0
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers: reopened from the directory, not copied
    assert len(pickle.dumps(ds)) < 1000 and clone[len(ds) - 2][0] == records[-2][0]
    np.testing.assert_array_equal(clone[len(ds) - 2][1], records[-2][1])
    with pytest.raises(KeyError, match="nope"):
        ds.find("nope")
    assert len(manifest["shards"]) >= 1


def test_megatron_index_layout(tmp_path):
    """The .idx reads like Megatron-LM's _IndexReader: header, int32 sizes, int64 byte pointers,
    int64 document index; the .bin holds the sequences at those pointers (dtype code 8 = uint16)."""
    sizes = (64, 512)
    records = _records(np.random.default_rng(1), 2, sizes)
    _write(tmp_path, records, sizes, 10**6)
    raw = (tmp_path / "shard-00000.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    n, n_docs = struct.unpack("<QQ", raw[18:34])
    assert (version, code, n, n_docs) == (1, 8, len(records), len(records) + 1)
    seq_sizes = np.frombuffer(raw, np.int32, n, 34)
    pointers = np.frombuffer(raw, np.int64, n, 34 + 4 * n)
    docs = np.frombuffer(raw, np.int64, n_docs, 34 + 12 * n)
    assert seq_sizes.tolist() == [2 * len(c) for _, c in records]
    assert docs.tolist() == list(range(n + 1))
    data = np.fromfile(tmp_path / "shard-00000.bin", np.uint16)
    for (_, codes), size, ptr in zip(records, seq_sizes, pointers):
        np.testing.assert_array_equal(data[ptr // 2 : ptr // 2 + size], codes.reshape(-1))


def test_incomplete_and_corrupt_directories(tmp_path):
    sizes = (16, 32)
    records = _records(np.random.default_rng(2), 2, sizes)
    manifest = _write(tmp_path, records, sizes, 400)
    n_levels, dtype = 2, "uint16"
    assert all(shard_complete(str(tmp_path), k, n_levels, dtype) for k in range(len(manifest["shards"])))
    write_manifest(str(tmp_path), {**manifest, "complete": False})
    with pytest.raises(TokenFileError, match="incomplete.*--resume"):
        TokenDataset(tmp_path)
    write_manifest(str(tmp_path), manifest)
    # A truncated .bin no longer counts as a complete shard.
    bin0 = tmp_path / "shard-00000.bin"
    whole = bin0.read_bytes()
    bin0.write_bytes(whole[:-2])
    assert not shard_complete(str(tmp_path), 0, n_levels, dtype)
    # ... and TokenDataset refuses it on open, naming the file and both sizes (it used to return short records).
    with pytest.raises(TokenFileError, match=f"shard-00000.bin: {len(whole) - 2} bytes, its index describes {len(whole)}"):
        TokenDataset(tmp_path)
    bin0.write_bytes(whole)
    # A damaged index: a clear error naming the file.
    idx1 = tmp_path / "shard-00001.idx"
    idx1.write_bytes(idx1.read_bytes()[:40])
    assert not shard_complete(str(tmp_path), 1, n_levels, dtype)
    with pytest.raises(TokenFileError, match="shard-00001.idx.*truncated"):
        read_shard_index(str(idx1))
    with pytest.raises(TokenFileError, match="shard-00001.idx"):
        TokenDataset(tmp_path)
    with pytest.raises(TokenFileError, match="no manifest.json"):
        TokenDataset(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text('{"format": "vqdna-tokens", "format_version": 99}')
    with pytest.raises(TokenFileError, match="format version 99"):
        TokenDataset(tmp_path)


def test_writer_checks(tmp_path):
    pieces = [Piece(0, "a", 0, 3, 3), Piece(1, "b", 0, 2, 2)]
    w = ShardWriter(str(tmp_path), 0, pieces, (4, 8))
    with pytest.raises(ValueError, match="level-0 code is outside its codebook of 4"):
        w.write(np.array([[4, 0]]))
    with pytest.raises(ValueError, match="level-1 code is outside its codebook of 8"):
        w.write(np.array([[0, -1]]))
    with pytest.raises(ValueError, match=r"must be \[m, 2\]"):
        w.write(np.zeros((3, 3), np.int64))
    w.write(np.array([[3, 7], [0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="got 3 rows.*hold 5"):
        w.close()
    w.abort()
    # Until close() succeeds nothing carries a final name.
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.bin.tmp"]
    assert not shard_complete(str(tmp_path), 0, 2, "uint16")


def test_sample_windows(tmp_path):
    sizes = (16, 32)
    records = _records(np.random.default_rng(3), 2, sizes)
    _write(tmp_path, records, sizes, 300)
    ds = TokenDataset(tmp_path)
    rng = np.random.default_rng(0)
    windows = ds.sample_windows(200, 64, rng)
    assert windows.shape == (200, 64, 2) and windows.dtype == np.int64
    # Every window is a slice of some record (padded with -1 past a short record's end).
    flat = {name: codes for name, codes in records}
    for w in windows[:40]:
        valid = int((w[:, 0] >= 0).sum())
        assert (w[valid:] == -1).all()
        assert any(
            len(c) >= valid and any((c[s : s + valid] == w[:valid]).all() for s in range(len(c) - valid + 1))
            for c in flat.values() if len(c)
        )
    # Short records (< 64) supply windows too, long ones most of them.
    assert (windows[:, -1, 0] == -1).any() and (windows[:, -1, 0] >= 0).any()
    with pytest.raises(ValueError, match="no bases"):
        empty = tmp_path / "empty"
        empty.mkdir()
        _write(empty, [("x", np.zeros((0, 2), np.int64))], sizes, 10)
        TokenDataset(empty).sample_windows(1, 4)


def test_sample_windows_draws_every_start_equally(tmp_path):
    """Record a (6 bases) has 3 starts for windows of 4, the last included; record b (2 bases) one:
    with codes = positions, the first code of a window is its start, and all 4 are equally likely."""
    sizes = (16,)
    a = np.arange(6, dtype=np.int64)[:, None]
    b = np.arange(10, 12, dtype=np.int64)[:, None]
    _write(tmp_path, [("a", a), ("b", b)], sizes, 100)
    windows = TokenDataset(tmp_path).sample_windows(4000, 4, np.random.default_rng(1))
    starts, counts = np.unique(windows[:, 0, 0], return_counts=True)
    assert starts.tolist() == [0, 1, 2, 10]
    assert (np.abs(counts / 4000 - 0.25) < 0.03).all(), counts


def _damage(directory, how):
    """Damage shard 1 of a token directory the way the probes did; returns the file a reader must name."""
    base = directory / "shard-00001"
    idx = read_shard_index(str(base) + ".idx")
    n = len(idx)
    del idx
    if how == "truncated-bin":
        data = (directory / "shard-00001.bin").read_bytes()
        (directory / "shard-00001.bin").write_bytes(data[:-2])
        return "shard-00001.bin"
    if how == "missing":
        os.remove(str(base) + ".bin")
        os.remove(str(base) + ".idx")
        return "shard-00001"
    path, offset, bit = {
        "idx-pointer": (str(base) + ".idx", 34 + 4 * n + 8 * (n - 1), 3),  # the last piece's byte pointer
        "idx-size": (str(base) + ".idx", 34, 2),  # the first piece's size (+-4 codes: still a multiple of 2 levels)
        "bin-bit": (str(base) + ".bin", None, 0),
    }[how]
    data = bytearray(open(path, "rb").read())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 1 << bit
    open(path, "wb").write(bytes(data))
    return os.path.basename(path)


DAMAGES = ["truncated-bin", "idx-pointer", "idx-size", "bin-bit", "missing"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_shard_is_refused_naming_it(tmp_path, how):
    """Each probe that TokenDataset used to read silently (short or shifted records): an error naming
    the shard at open, or (a flipped .bin bit, which only a checksum sees) with verify=True."""
    sizes = (16, 32)
    _write(tmp_path, _records(np.random.default_rng(4), 2, sizes), sizes, 400)
    assert len(read_manifest(str(tmp_path))["shards"]) >= 3 and len(TokenDataset(tmp_path)) == 10
    name = _damage(tmp_path, how)
    if how == "bin-bit":
        TokenDataset(tmp_path)  # sizes and indexes still agree: only the checksum can tell
    else:
        with pytest.raises(TokenFileError, match=name):
            TokenDataset(tmp_path)
    with pytest.raises(TokenFileError, match=name):
        TokenDataset(tmp_path, verify=True)
    problems = verify_directory(str(tmp_path))
    assert len(problems) == 1 and name in problems[0], problems


@pytest.mark.parametrize("where", ["parent", "absolute", "other-pattern"])
def test_manifest_shard_names_must_be_plain(tmp_path, where):
    """A manifest naming a shard by a path ("../victim/shard-00000", an absolute path) made TokenDataset
    read outside its directory; now any name but shard_name(k) is refused."""
    sizes = (16, 32)
    records = _records(np.random.default_rng(5), 2, sizes)
    for sub in ("victim", "d"):  # the victim holds valid shards: the old reader opened them without a word
        (tmp_path / sub).mkdir()
        manifest = _write(tmp_path / sub, records, sizes, 10**6)
    name = {"parent": "../victim/shard-00000", "absolute": str(tmp_path / "victim" / "shard-00000"), "other-pattern": "shard-0"}[where]
    manifest["shards"][0]["name"] = name
    write_manifest(str(tmp_path / "d"), manifest)
    with pytest.raises(TokenFileError, match=f"shard 0 is named {re.escape(repr(name))}"):
        TokenDataset(tmp_path / "d")


def test_name_out_of_range_is_an_index_error(tmp_path):
    sizes = (16, 32)
    records = _records(np.random.default_rng(6), 2, sizes)
    _write(tmp_path, records, sizes, 300)
    ds = TokenDataset(tmp_path)
    assert ds.name(-1) == records[-1][0] and ds.name(-len(records)) == records[0][0]
    for i in (len(records), -len(records) - 1):
        with pytest.raises(IndexError, match=f"record {i} out of range \\({len(records)} records\\)"):
            ds.name(i)


def test_format_1_directories_stay_readable(tmp_path):
    """A directory written before format 2 (no checksums, .idx trailer version 1) still opens, passes
    the structure checks and `verify_directory` (sizes and indexes only), but is not continued."""
    v1 = os.path.join(os.path.dirname(__file__), "fixtures", "tokens-v1")
    ds = TokenDataset(v1, verify=True)
    assert ds.manifest["format_version"] == 1 and len(ds.manifest["shards"]) == 2
    assert [ds.name(i) for i in range(len(ds))] == ["r0", "r1", "r2", "r3", "r4"]
    assert ds.lengths.tolist() == [0, 5, 63, 200, 3]
    for i in range(len(ds)):
        codes = ds[i][1]
        assert codes.shape == (ds.lengths[i], 2) and (codes < np.array(ds.codebook_sizes)).all()
    assert verify_directory(v1) == []
    assert read_shard_index(os.path.join(v1, "shard-00000.idx")).bin_checksum is None


def test_format_2_directories_stay_readable():
    """A directory written in format 2 (checksums, no name index) opens, verifies and holds the same
    codes as the format 1 directory of the same input (tests/data/fixtures/README.md)."""
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    v1, v2 = TokenDataset(os.path.join(fixtures, "tokens-v1")), TokenDataset(os.path.join(fixtures, "tokens-v2"), verify=True)
    assert v2.manifest["format_version"] == 2 and verify_directory(v2.directory) == []
    assert read_shard_index(os.path.join(v2.directory, "shard-00000.idx")).bin_checksum is not None
    assert len(v1) == len(v2) == 5 and v2.lengths.tolist() == [0, 5, 63, 200, 3]
    for i in range(len(v1)):
        assert v1.name(i) == v2.name(i)
        np.testing.assert_array_equal(v1[i][1], v2[i][1])


def test_open_keeps_no_per_record_memory(tmp_path):
    """An open TokenDataset holds memory independent of its record count (issue 22): 100 k records
    (one shard) leave < 100 kB allocated (a per-record array of first pieces and lengths: 1.6 MB);
    records, names and lengths still come out right."""
    import tracemalloc

    from vqdna.streaming.token_files import Pieces

    n = 100_000
    names = [b"r%d" % i for i in range(n)]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in names], out=offsets[1:])
    ones = np.ones(n, np.int64)
    pieces = Pieces(np.arange(n, dtype=np.int64), b"".join(names), offsets, np.zeros(n, np.int64), ones, ones)
    w = ShardWriter(str(tmp_path), 0, pieces, (64,))
    w.write((np.arange(n) % 64)[:, None])
    w.close()
    manifest = {
        "format": "vqdna-tokens", "format_version": FORMAT_VERSION, "complete": True, "levels": 1,
        "codebook_sizes": [64], "dtype": codes_dtype((64,)), "shards": [shard_entry(str(tmp_path), 0)[0]],
        "records": n, "bases": n,
    }
    write_manifest(str(tmp_path), manifest)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ds = TokenDataset(tmp_path)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000, f"an open TokenDataset of {n} records keeps {kept} bytes"
    assert len(ds) == n and ds[n - 1][0] == f"r{n - 1}" and int(ds[12345][1][0, 0]) == 12345 % 64
    assert ds.find("r777") == 777 and ds.lengths.sum() == n
