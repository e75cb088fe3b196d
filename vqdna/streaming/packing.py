"""Packing (docs/design.md §2.5): inside a unit, each piece is cut into windows of `window` bases read with a halo
of R = model.receptive_radius bases on each side (clipped at the record ends), so a base's codes do
not depend on where its record was cut. Segments (windows, or whole short records) are packed greedily
into rows of window + 2R positions, `gap` pad positions (PAD, masked) apart, and rows into batches.
The gap only has to cover one convolution's reach, not R: the encoder zeroes masked positions after
every layer (model.isolation_gap, 3 for vqdna-small against R = 14), so an 8-bp record costs 11
positions instead of 22.

Vectorised: the segments of a unit are numpy columns; Python loops once per row (a row holds one
long window or hundreds of short records), never per record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from vqdna.data.alphabet import PAD
from vqdna.streaming.units import Unit

__all__ = ["Batch", "batches"]


@dataclass
class Batch:
    ids: np.ndarray  # uint8 [rows, L], PAD where no base
    gather: np.ndarray  # int64 [m]: flat positions (row * L + col) of the output bases, in piece order
    ids_t: Optional[torch.Tensor] = None  # pinned copy (GPU path)
    codes: Optional[torch.Tensor] = None  # int32 [rows, L, n_levels] on the host
    event: Optional[object] = None  # CUDA event after the device-to-host copy
    timing: Optional[tuple] = None  # CUDA events around the compute


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: start[i], start[i] + 1, ..., start[i] + lengths[i] - 1 for each i (int64)."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


_CHUNK_SEGMENTS = 1 << 16  # segments laid out at a time: bounds the packing's arrays, not the unit


def _segments(unit: Unit, p0: int, p1: int, window: int, halo: int) -> tuple[np.ndarray, ...]:
    """Every window of pieces [p0, p1), in piece order: (piece, out_start, out_end, in_start, in_end),
    int64 [segments] each, in record coordinates (out: the bases coded; in: with the halo)."""
    lengths, starts = unit.pieces.lengths, unit.starts  # packing coordinates (units.Unit)
    n_win = -(-lengths[p0:p1] // window)  # ceil; 0 for an empty piece (it has no window)
    piece = np.repeat(np.arange(p0, p1, dtype=np.int64), n_win)
    k = np.arange(len(piece), dtype=np.int64) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    out_start = starts[piece] + k * window
    out_end = np.minimum(out_start + window, starts[piece] + lengths[piece])
    in_start = np.maximum(out_start - halo, 0)
    in_end = np.minimum(out_end + halo, unit.record_lengths[piece])
    return piece, out_start, out_end, in_start, in_end


def _piece_chunks(unit: Unit, window: int) -> Iterator[tuple[int, int]]:
    """Ranges of pieces with about _CHUNK_SEGMENTS windows each (at least one piece)."""
    n = len(unit.pieces)
    cum = np.cumsum(-(-unit.pieces.lengths // window))
    p0 = 0
    while p0 < n:
        done = int(cum[p0 - 1]) if p0 else 0
        p1 = max(p0 + 1, int(np.searchsorted(cum, done + _CHUNK_SEGMENTS, side="right")))
        yield p0, p1
        p0 = p1


def _rows(span: np.ndarray, gap: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy rows for segments of `span` input positions laid out from an empty row: each goes to the
    current row if it fits (after a gap of `gap`), else starts the next. Returns (row of each
    segment, its column), int64 [segments]. Python loops per row, not per segment."""
    n = len(span)
    ends = np.cumsum(span + gap)  # column after segment i's trailing gap, if all were in one row
    fit = ends - gap  # segment i fits in a row starting at segment f iff fit[i] - ends[f - 1] <= width
    firsts, first, base = [], 0, 0
    while first < n:
        firsts.append(first)
        first = int(np.searchsorted(fit, base + width, side="right"))  # > first: span <= width
        base = int(ends[first - 1])
    row_first = np.asarray(firsts, dtype=np.int64)
    row = np.repeat(np.arange(len(row_first), dtype=np.int64), np.diff(np.append(row_first, n)))
    row_base = np.concatenate([[0], ends[row_first[1:] - 1]])
    return row, ends - (span + gap) - row_base[row]


def batches(unit: Unit, window: int, halo: int, rows: int, gap: Optional[int] = None) -> Iterator[Batch]:
    """Pack the unit's windows into batches of at most `rows` rows of window + 2 * halo positions
    (trimmed to the longest row used); segments in a row are `gap` pad positions apart (None: halo,
    right for any encoder; the model's isolation_gap is enough for vqdna's). Each segment
    goes to the current row if it fits, else it starts the next row (greedy, in piece order).
    Segments are laid out a chunk at a time; the segments of a batch not yet complete at the end of a
    chunk are laid out again with the next chunk (a batch starts on an empty row either way)."""
    gap = halo if gap is None else gap
    if not 0 <= gap <= halo:
        raise ValueError(f"gap must be in 0..halo={halo}, got {gap}")
    width = window + 2 * halo
    pending = tuple(np.zeros(0, np.int64) for _ in range(5))
    chunks = list(_piece_chunks(unit, window)) or [(0, 0)]
    for c, (p0, p1) in enumerate(chunks):
        seg = tuple(np.concatenate([a, b]) for a, b in zip(pending, _segments(unit, p0, p1, window, halo)))
        if len(seg[0]) == 0:
            continue
        last = c == len(chunks) - 1
        row, col = _rows(seg[4] - seg[3], gap, width)
        n_rows = int(row[-1]) + 1
        # Batch b is complete once a segment starts row (b + 1) * rows; at the end every batch is.
        complete = -(-n_rows // rows) if last else (n_rows - 1) // rows
        bounds = np.searchsorted(row, np.arange(complete + 1) * rows)
        for b in range(complete):
            s0, s1 = int(bounds[b]), int(bounds[b + 1])
            yield _batch(unit, [a[s0:s1] for a in seg], row[s0:s1] - b * rows, col[s0:s1])
        pending = tuple(a[int(bounds[complete]) :] for a in seg)


def _batch(unit: Unit, seg: list, row: np.ndarray, col: np.ndarray) -> Batch:
    """One batch: ids [rows used, longest row] filled from unit.seq, and the gather of its output bases."""
    piece, out_start, out_end, in_start, in_end = seg
    span = in_end - in_start
    used = int((col + span).max())
    ids = np.full((int(row[-1]) + 1, used), PAD, dtype=np.uint8)
    src = unit.seq_offsets[piece] + (in_start - unit.seq_starts[piece])  # first input base in unit.seq
    ids.reshape(-1)[_ranges(row * used + col, span)] = unit.seq[_ranges(src, span)]
    gather = _ranges(row * used + col + (out_start - in_start), out_end - out_start)
    return Batch(ids, gather)
