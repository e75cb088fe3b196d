"""Packing (DESIGN 2.5): inside a unit, each piece is cut into windows of `window` bases read with a halo
of R = model.receptive_radius bases on each side (clipped at the record ends), so a base's codes do
not depend on where its record was cut. Segments (windows, or whole short records) are packed into
rows of window + 2R positions, R pad positions (PAD, masked) apart, and rows into batches."""

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


def batches(unit: Unit, window: int, halo: int, rows: int) -> Iterator[Batch]:
    """Pack the unit's windows into batches of at most `rows` rows of window + 2 * halo positions
    (trimmed to the longest row used); segments in a row are `halo` pad positions apart."""
    width = window + 2 * halo
    ids = np.full((rows, width), PAD, dtype=np.uint8)
    row, col, used = 0, 0, 0
    starts: list[int] = []  # per segment: row * width + col of its first output base
    lengths: list[int] = []

    def emit(n_rows: int) -> Batch:
        s = np.asarray(starts, dtype=np.int64)
        seg_rows, seg_cols = np.divmod(s, width)
        lens = np.asarray(lengths, dtype=np.int64)
        offsets = np.cumsum(lens) - lens
        # position j of segment i sits at seg_rows[i] * used + seg_cols[i] + j in the trimmed batch
        gather = np.repeat(seg_rows * used + seg_cols - offsets, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        return Batch(np.ascontiguousarray(ids[:n_rows, :used]), gather)

    for piece in unit.pieces:
        seq = unit.records[piece.ordinal]
        end = piece.start + piece.length
        for out_start in range(piece.start, end, window):
            out_end = min(out_start + window, end)
            in_start, in_end = max(0, out_start - halo), min(piece.record_length, out_end + halo)
            if col + (in_end - in_start) > width:  # does not fit: next row
                row, col = row + 1, 0
                if row == rows:
                    yield emit(rows)
                    ids = np.full((rows, width), PAD, dtype=np.uint8)
                    row, used, starts, lengths = 0, 0, [], []
            ids[row, col : col + in_end - in_start] = seq[in_start:in_end]
            starts.append(row * width + col + out_start - in_start)
            lengths.append(out_end - out_start)
            used = max(used, col + in_end - in_start)
            col += in_end - in_start + halo
    if lengths:
        yield emit(row + 1)
