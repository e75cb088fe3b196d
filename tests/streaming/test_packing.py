"""Packing (vqdna.streaming.packing): the vectorised, chunked packing lays out exactly what the
per-segment greedy loop (the definition, below) lays out, whatever the chunk size."""

import numpy as np
import pytest

from vqdna.data.alphabet import PAD
from vqdna.streaming import packing
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
