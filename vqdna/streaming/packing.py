"""Packing (docs/design.md §2.5): inside a unit, each piece is cut into windows of `window` bases read with a halo
of R = model.receptive_radius bases on each side (clipped at the record ends), so a base's codes do
not depend on where its record was cut. Segments (windows, or whole short records) are packed greedily
into rows of window + 2R positions, `gap` pad positions (PAD, masked) apart, and rows into batches.
The gap only has to cover one convolution's reach, not R: the encoder zeroes masked positions after
every layer (model.isolation_gap, 3 for vqdna-small against R = 14), so an 8-bp record costs 11
positions instead of 22.

Dereplication (`dereplicate=True`): a unit's short records (whole records of one window, two of which
fit in a row) that repeat an earlier one of the unit exactly are not packed; the encoder codes each
distinct one once and the writer copies its codes to every repeat (`Dereplication.scatter`). Exact
because packed segments are isolated: a record's codes are those of the record encoded alone,
wherever it is packed.

Vectorised: the segments of a unit are numpy columns; Python loops once per row (a row holds one
long window or hundreds of short records) and once per distinct short-record length, never per
record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from vqdna.data.alphabet import PAD
from vqdna.streaming.token_files import Pieces
from vqdna.streaming.units import Unit

__all__ = ["Batch", "Dereplication", "batches", "dereplication", "short_limit"]


@dataclass
class Batch:
    ids: np.ndarray  # uint8 [rows, L], PAD where no base
    gather: np.ndarray  # int64 [m]: flat positions (row * L + col) of the output bases, in piece order
    ids_t: Optional[torch.Tensor] = None  # pinned copy (GPU path)
    codes: Optional[torch.Tensor] = None  # int32 [rows, L, n_levels] on the host
    event: Optional[object] = None  # CUDA event after the device-to-host copy
    timing: Optional[tuple] = None  # CUDA events around the compute
    # Dereplicated unit: (plan, k0, e0, e1): the batch codes the plan's kept bases [k0, k0 + len(gather))
    # and the unit's output bases [e0, e1) are written after it (Dereplication.scatter).
    scatter: Optional[tuple] = None


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


def batches(unit: Unit, window: int, halo: int, rows: int, gap: Optional[int] = None, dereplicate: bool = False) -> Iterator[Batch]:
    """Pack the unit's windows into batches of at most `rows` rows of window + 2 * halo positions
    (trimmed to the longest row used); segments in a row are `gap` pad positions apart (None: halo,
    right for any encoder; the model's isolation_gap is enough for vqdna's). Each segment
    goes to the current row if it fits, else it starts the next row (greedy, in piece order).
    Segments are laid out a chunk at a time; the segments of a batch not yet complete at the end of a
    chunk are laid out again with the next chunk (a batch starts on an empty row either way).
    dereplicate: pack only the first of identical short records (`dereplication`); the batches then
    carry `scatter`, and their output is Dereplication.scatter's, not codes[gather] alone. Only
    valid for an encoder whose packed segments are isolated (gap >= its isolation gap)."""
    gap = halo if gap is None else gap
    if not 0 <= gap <= halo:
        raise ValueError(f"gap must be in 0..halo={halo}, got {gap}")
    plan = dereplication(unit, short_limit(window, halo, gap)) if dereplicate else None
    if plan is None:
        yield from _packed(unit, window, halo, rows, gap)
        return
    k0 = e0 = 0
    for batch in _packed(plan.unit, window, halo, rows, gap):
        k1 = k0 + len(batch.gather)
        e1 = plan.output_end(k1)
        batch.scatter = (plan, k0, e0, e1)
        yield batch
        k0, e0 = k1, e1
    plan.unit = None  # packed: the writer's batches keep the plan, not the unit's bases


def _packed(unit: Unit, window: int, halo: int, rows: int, gap: int) -> Iterator[Batch]:
    """batches() of every window of the unit (no dereplication)."""
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


# --- dereplication ---------------------------------------------------------------------------------

_SCATTER_BASES = 1 << 18  # output bases written at a time by Dereplication.scatter: bounds its arrays


def short_limit(window: int, halo: int, gap: int) -> int:
    """The longest record that is dereplicated: one window, and two of them (and the gap) fit in a row."""
    return min(window, (window + 2 * halo - gap) // 2)


def _distinct(seq: np.ndarray, src: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `length` bases at seq[src[i]:][:length] (src int64 [m], in piece order): (first, group)
    int64: `first` [distinct] the position in src of each distinct sequence's first occurrence (in
    key order), `group` [m] the distinct sequence of each record (an index into first). Keys are the
    bases' bytes, zero-padded to whole uint64 words, sorted by np.lexsort (stable: the first of equal
    keys is the earliest record)."""
    m, words = len(src), -(-length // 8)
    keys = np.zeros((m, words * 8), dtype=np.uint8)
    for c in range(length):  # a column at a time: no index array of m * length int64
        keys[:, c] = seq[src + c]
    cols = keys.view(np.uint64)  # [m, words]
    order = np.lexsort(cols.T[::-1])
    ordered = cols[order]
    new = np.ones(m, dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    group = np.empty(m, dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    return order[new], group


@dataclass
class Dereplication:
    """A unit whose repeated short records are coded once (docs/design.md §2.5). Output bases are the
    unit's in piece order (ostart int64 [pieces + 1]: piece j's are [ostart[j], ostart[j + 1])); `unit`
    holds the kept pieces (every piece but the repeats: kept int64 [kept]; None once they are
    packed, so the writer's batches do not keep the unit's bases alive), whose coded bases come
    in that order (kstart int64 [kept + 1]). A short piece j (short bool [pieces]) takes its codes from
    the cache at cache_start[j] (its first occurrence's codes, stored when that one is coded); any
    other piece from the batch that codes it, at kept-base kpos[j] (int64 [pieces], -1: a repeat)."""

    unit: Optional[Unit]
    kept: np.ndarray
    kstart: np.ndarray
    ostart: np.ndarray
    short: np.ndarray
    kpos: np.ndarray
    cache_start: np.ndarray
    cache_bases: int
    copied: int  # records whose codes are copied (the repeats)
    cache: Optional[np.ndarray] = None  # [cache_bases, levels] codes, allocated by the first scatter

    def output_end(self, k1: int) -> int:
        """The end of the output bases that can be written once kept bases [0, k1) are coded: all
        those before kept base k1's own (a repeat's first occurrence is before it)."""
        if k1 >= self.kstart[-1]:
            return int(self.ostart[-1])
        k = int(np.searchsorted(self.kstart, k1, side="right")) - 1
        return int(self.ostart[self.kept[k]]) + k1 - int(self.kstart[k])

    def scatter(self, codes: np.ndarray, k0: int, e0: int, e1: int) -> Iterator[np.ndarray]:
        """codes [n, levels] of kept bases [k0, k0 + n) -> the unit's output codes [e0, e1) in piece
        order, in parts of at most _SCATTER_BASES bases. Must be called batch after batch, in order."""
        if self.cache is None:
            self.cache = np.empty((self.cache_bases, codes.shape[1]), dtype=codes.dtype)
        for a in range(e0, e1, _SCATTER_BASES):
            b = min(a + _SCATTER_BASES, e1)
            j = np.arange(np.searchsorted(self.ostart, a, side="right") - 1, np.searchsorted(self.ostart, b), dtype=np.int64)
            lo, hi = np.maximum(self.ostart[j], a), np.minimum(self.ostart[j + 1], b)
            n, off, short, kpos = hi - lo, lo - self.ostart[j], self.short[j], self.kpos[j]
            first = short & (kpos >= 0)  # first occurrences: coded in this batch, cached for the repeats
            self.cache[_ranges(self.cache_start[j[first]] + off[first], n[first])] = codes[_ranges(kpos[first] - k0 + off[first], n[first])]
            dst = np.cumsum(n) - n
            part = np.empty((b - a, codes.shape[1]), dtype=codes.dtype)
            part[_ranges(dst[short], n[short])] = self.cache[_ranges(self.cache_start[j[short]] + off[short], n[short])]
            part[_ranges(dst[~short], n[~short])] = codes[_ranges(kpos[~short] - k0 + off[~short], n[~short])]
            yield part


def dereplication(unit: Unit, limit: int) -> Optional[Dereplication]:
    """The unit's Dereplication, or None when no short record repeats (then nothing changes). Short:
    a whole record (not a piece of a split one) of 1..limit bases. Records are compared by their base
    ids, one np.lexsort per distinct length."""
    lengths = unit.pieces.lengths
    n = len(lengths)
    short = (unit.starts == 0) & (unit.record_lengths == lengths) & (lengths > 0) & (lengths <= limit)
    candidates = np.flatnonzero(short)
    if len(candidates) < 2:
        return None
    by_length = candidates[np.argsort(lengths[candidates], kind="stable")]  # piece order within a length
    cuts = np.flatnonzero(np.diff(lengths[by_length])) + 1
    rep = np.empty_like(by_length)  # per candidate (by_length order): the first piece with its bases
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(by_length)]])):
        idx = by_length[a:b]
        src = unit.seq_offsets[idx] + (unit.starts[idx] - unit.seq_starts[idx])  # its first base in unit.seq
        first, group = _distinct(unit.seq, src, int(lengths[idx[0]]))
        rep[a:b] = idx[first[group]]
    keep = np.ones(n, dtype=bool)
    keep[by_length[rep != by_length]] = False
    if keep.all():
        return None
    kept = np.flatnonzero(keep)
    p = unit.pieces
    sub = Pieces(p.ordinals[kept], b"", np.zeros(len(kept) + 1, np.int64), p.starts[kept], lengths[kept], p.record_lengths[kept])
    sub_unit = Unit(unit.index, sub, unit.seq, unit.seq_starts[kept], unit.seq_offsets[kept], unit.starts[kept], unit.record_lengths[kept])
    kstart = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths[kept], out=kstart[1:])
    ostart = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=ostart[1:])
    kpos = np.full(n, -1, dtype=np.int64)
    kpos[kept] = kstart[:-1]
    cached = kept[short[kept]]  # distinct short records, in the order they are coded
    cache_start = np.zeros(n, dtype=np.int64)
    cache_start[cached] = np.cumsum(lengths[cached]) - lengths[cached]
    cache_start[by_length] = cache_start[rep]  # a repeat reads its first occurrence's codes
    return Dereplication(sub_unit, kept, kstart, ostart, short, kpos, cache_start, int(lengths[cached].sum()), n - len(kept))
