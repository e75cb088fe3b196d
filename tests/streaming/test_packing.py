"""Packing (vqdna.streaming.packing): the vectorised, chunked packing lays out exactly what the
per-segment greedy loop (the definition, below) lays out, whatever the chunk size; repeats of a short
record in a unit are coded once and copied, to the same bytes."""

import numpy as np
import pytest

from tests.streaming._fixtures import dir_bytes, mismatches, model, one_thread  # noqa: F401 (fixtures)
from vqdna.data.alphabet import PAD
from vqdna.streaming import packing, tokenize_files
from vqdna.streaming.token_files import Piece, Pieces
from vqdna.streaming.units import Unit


def _loop_batches(records, pieces, window, halo, rows, gap=None):
    """The definition: one segment at a time, to the current row if it fits, else the next row; `gap`
    (default halo) pad positions after each segment."""
    gap = halo if gap is None else gap
    width = window + 2 * halo
    ids = np.full((rows, width), PAD, dtype=np.uint8)
    row, col, used, starts, lengths, out = 0, 0, 0, [], [], []

    def emit(n_rows):
        s = np.asarray(starts, dtype=np.int64)
        seg_rows, seg_cols = np.divmod(s, width)
        lens = np.asarray(lengths, dtype=np.int64)
        offsets = np.cumsum(lens) - lens
        gather = np.repeat(seg_rows * used + seg_cols - offsets, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        return ids[:n_rows, :used].copy(), gather

    for p in pieces:
        seq = records[p.ordinal]
        for out_start in range(p.start, p.start + p.length, window):
            out_end = min(out_start + window, p.start + p.length)
            in_start, in_end = max(0, out_start - halo), min(p.record_length, out_end + halo)
            if col + (in_end - in_start) > width:
                row, col = row + 1, 0
                if row == rows:
                    out.append(emit(rows))
                    ids = np.full((rows, width), PAD, dtype=np.uint8)
                    row, used, starts, lengths = 0, 0, [], []
            ids[row, col : col + in_end - in_start] = seq[in_start:in_end]
            starts.append(row * width + col + out_start - in_start)
            lengths.append(out_end - out_start)
            used = max(used, col + in_end - in_start)
            col += in_end - in_start + gap
    if lengths:
        out.append(emit(row + 1))
    return out


def _unit(rng, n_records, max_len, split):
    """A unit of random records; with `split`, the first and last are only partly in the unit."""
    records = [rng.integers(0, 5, int(rng.integers(0, max_len + 1))).astype(np.uint8) for _ in range(n_records)]
    pieces = []
    for i, r in enumerate(records):
        start, length = 0, len(r)
        if split and i == 0 and len(r) > 2:
            start = len(r) // 2
            length = len(r) - start
        if split and i == n_records - 1 and len(r) > 2:
            length = len(r) // 2
        pieces.append(Piece(i, f"r{i}", start, length, len(r)))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in records])[:-1]]).astype(np.int64)
    unit = Unit(0, Pieces.of(pieces), np.concatenate(records) if records else np.zeros(0, np.uint8),
                np.zeros(len(records), np.int64), offsets)
    return records, pieces, unit


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 16])
@pytest.mark.parametrize("window,halo,gap,rows,max_len", [(7, 8, 8, 3, 40), (50, 4, 4, 4, 300), (16, 0, 0, 2, 20),
                                                         (30, 3, 3, 5, 8), (30, 14, 3, 5, 8), (7, 8, 0, 3, 40)])
def test_packing_equals_the_per_segment_loop(monkeypatch, chunk, window, halo, gap, rows, max_len):
    monkeypatch.setattr(packing, "_CHUNK_SEGMENTS", chunk)
    rng = np.random.default_rng(window * 1000 + max_len)
    for split in (False, True):
        records, pieces, unit = _unit(rng, 60, max_len, split)
        want = _loop_batches(records, pieces, window, halo, rows, gap)
        got = list(packing.batches(unit, window, halo, rows, gap))
        assert len(got) == len(want)
        for g, (ids, gather) in zip(got, want):
            np.testing.assert_array_equal(g.ids, ids)
            np.testing.assert_array_equal(g.gather, gather)


def test_units_of_empty_records_give_no_batch():
    rng = np.random.default_rng(0)
    _, _, unit = _unit(rng, 0, 5, False)
    assert list(packing.batches(unit, 8, 2, 4)) == []
    records, pieces, unit = _unit(rng, 5, 0, False)
    assert list(packing.batches(unit, 8, 2, 4)) == [] == _loop_batches(records, pieces, 8, 2, 4)


def test_gap_outside_0_to_halo_is_refused():
    _, _, unit = _unit(np.random.default_rng(0), 3, 5, False)
    for gap in (-1, 5):
        with pytest.raises(ValueError, match="gap must be in 0..halo=4"):
            next(packing.batches(unit, 8, 4, 2, gap))


def _fake_encode(ids: np.ndarray) -> np.ndarray:
    """uint8 [rows, L] -> int64 codes [rows, L, 2] from each position and its two neighbours (PAD
    beyond the row): segments a gap >= 1 apart are isolated, as the real encoder's are."""
    x = ids.astype(np.int64)
    left = np.pad(x, ((0, 0), (1, 0)), constant_values=PAD)[:, :-1]
    right = np.pad(x, ((0, 0), (0, 1)), constant_values=PAD)[:, 1:]
    return np.stack([x * 36 + left * 6 + right, (x + 3 * left) % 7], axis=-1)


def _unit_output(unit, window, halo, rows, gap, dereplicate):
    """The unit's output codes [bases, 2] in piece order (as the pipeline's writer assembles them)
    and the number of bases coded."""
    parts, coded = [np.zeros((0, 2), np.int64)], 0
    for b in packing.batches(unit, window, halo, rows, gap, dereplicate=dereplicate):
        codes = _fake_encode(b.ids).reshape(-1, 2)[b.gather]
        coded += len(codes)
        if b.scatter is None:
            parts.append(codes)
        else:
            plan, k0, e0, e1 = b.scatter
            parts.extend(plan.scatter(codes, k0, e0, e1))
    return np.concatenate(parts), coded


def _repeats_unit(rng, limit, window, split):
    """A unit of records drawn from a small pool (so most repeat): lengths 1..4, `limit` and
    `limit` + 1 (the short/long threshold), longer than a window, empty; N bases (id 4); with
    `split`, the first and last records are pieces of longer ones."""
    lengths = [1, 1, 2, 3, 4, limit - 1, limit, limit, limit + 1, limit + 1, 2 * window + 3, 0]
    pool = [rng.integers(0, 5, n).astype(np.uint8) for n in lengths]
    pool.append(pool[-2].copy())  # a repeated long record: coded each time (only short ones are dereplicated)
    records = [pool[int(i)].copy() for i in rng.integers(0, len(pool), 150)]
    records += [rng.integers(0, 4, 3).astype(np.uint8) for _ in range(5)]  # a few distinct ones
    records = [records[i] for i in rng.permutation(len(records))]
    if split:
        records[0] = pool[5].copy()  # also a short record, but only partly in the unit: not dereplicated
        records[-1] = pool[-3].copy()
    pieces = []
    for i, r in enumerate(records):
        start, length = 0, len(r)
        if split and i == 0:
            start, length = len(r) // 2, len(r) - len(r) // 2
        if split and i == len(records) - 1:
            length = len(r) // 2
        pieces.append(Piece(i, f"r{i}", start, length, len(r)))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in records])[:-1]]).astype(np.int64)
    return Unit(0, Pieces.of(pieces), np.concatenate(records), np.zeros(len(records), np.int64), offsets)


@pytest.mark.parametrize("scatter_bases", [1, 7, 1 << 20])
@pytest.mark.parametrize("window,halo,gap,rows", [(30, 3, 3, 2), (16, 8, 3, 4), (50, 4, 1, 1), (7, 8, 3, 3)])
def test_dereplicated_output_equals_coding_every_record(monkeypatch, scatter_bases, window, halo, gap, rows):
    """Coding each distinct short record once and copying its codes to the repeats gives the unit's
    output codes, piece by piece, exactly as coding every record (the encoder's segments isolated)."""
    monkeypatch.setattr(packing, "_SCATTER_BASES", scatter_bases)
    monkeypatch.setattr(packing, "_CHUNK_SEGMENTS", 5)
    rng = np.random.default_rng(window + rows)
    limit = packing.short_limit(window, halo, gap)
    for split in (False, True):
        unit = _repeats_unit(rng, limit, window, split)
        want, coded_all = _unit_output(unit, window, halo, rows, gap, False)
        got, coded = _unit_output(unit, window, halo, rows, gap, True)
        np.testing.assert_array_equal(got, want)
        plan = packing.dereplication(unit, limit)
        assert plan is not None and plan.copied > 50  # the dereplicated path ran
        assert coded == coded_all - int(unit.pieces.lengths.sum() - plan.unit.pieces.lengths.sum()) < coded_all
        lengths = unit.pieces.lengths
        repeats = np.setdiff1d(np.arange(len(lengths)), plan.kept)
        assert set(lengths[repeats]) <= set(range(1, limit + 1))  # only short records are ever copied
        assert (lengths[plan.kept] == limit + 1).sum() == (lengths == limit + 1).sum()
        if split:  # pieces of split records are coded, even when equal to a whole short record
            assert {0, len(lengths) - 1} <= set(plan.kept.tolist())


def test_units_without_repeats_are_not_dereplicated():
    rng = np.random.default_rng(3)
    records, _, unit = _unit(rng, 40, 200, True)
    distinct = {r.tobytes() for r in records if 0 < len(r) <= 20}
    assert len(distinct) == sum(0 < len(r) <= 20 for r in records)  # the premise: no short repeat
    assert packing.dereplication(unit, 20) is None
    assert all(b.scatter is None for b in packing.batches(unit, 30, 4, 3, 3, dereplicate=True))


def _repeats_fasta(path, seed=0):
    """400 records drawn from a small pool (most repeat, some runs of the same record in a row):
    lengths 1..8, 38 and 39 (the short/long threshold at window 64: short_limit(64, 8, 3) = 38), one
    over a window, empty; N and IUPAC letters; plus a few distinct records."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGTACGTNacgtRY", np.uint8)
    pool = [letters[rng.integers(0, len(letters), n)].tobytes().decode() for n in (1, 2, 2, 5, 8, 8, 37, 38, 38, 39, 39, 90, 0)]
    seqs = [pool[int(i)] for i in rng.integers(0, len(pool), 380)] + [pool[6]] * 20
    seqs = [seqs[i] for i in rng.permutation(len(seqs))] + ["ACGTNACGT"[: 1 + i % 9] + "T" * i for i in range(12)]
    path.write_text("".join(f">r{i} copy\n{s}\n" for i, s in enumerate(seqs)))
    return str(path), seqs


@pytest.mark.parametrize("shard_records", [37, 1000])  # 37: unit boundaries fall inside runs of repeats
def test_repeated_short_records_are_coded_once_per_unit(tmp_path, model, monkeypatch, shard_records):
    """Repeats of a short record in a work unit are coded once and copied: the directory is byte for byte
    the one coding every record, with fewer bases through the encoder."""
    from vqdna.streaming import packing

    fasta, seqs = _repeats_fasta(tmp_path / "in.fa")
    bases = sum(map(len, seqs))
    kw = dict(window=64, batch_size=3, shard_records=shard_records)
    stats = tokenize_files([fasta], str(tmp_path / "derep"), model, **kw)
    monkeypatch.setattr(packing, "dereplication", lambda unit, limit: None)
    every = tokenize_files([fasta], str(tmp_path / "every"), model, **kw)
    assert dir_bytes(tmp_path / "derep") == dir_bytes(tmp_path / "every")
    assert stats.bases == every.bases == every.encoded_bases == bases and stats.records == len(seqs)
    short = [s.upper().replace("R", "N").replace("Y", "N") for s in seqs if 1 <= len(s) <= 38]
    repeats = len(short) - len(set(short))  # copies in one unit (every letter but ACGT reads as N)
    assert every.copied_records == 0  # the dereplicated path ran, and all of it in one unit:
    assert stats.copied_records == repeats if stats.shards_written == 1 else repeats / 2 < stats.copied_records < repeats
    assert stats.encoded_bases < 0.7 * bases and stats.encoded_positions < 0.7 * every.encoded_positions
    assert mismatches(model, fasta, tmp_path / "derep") <= 3  # near-ties at most (as coding each alone)
