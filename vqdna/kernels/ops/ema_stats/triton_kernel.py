"""Triton EMA statistics (docs/design.md §2.3): per-code counts [K] and vector sums [K, D], float32.

The vector of row i is x_i, or 2 x_i - prev_codebook[prev_codes_i] (HRQ's H_l, formed in float32
on the fly and never stored); rows whose mask is False count for nothing.

Two paths:
- direct (fast mode, small N): one program per tile of rows x dims adds its rows into zeroed outputs
  with float atomics. With many rows per code every atomic of a code hits the same K x D
  addresses, so for large N the sorted path is used instead.
- sorted (deterministic mode, and fast mode for large N): the rows are sorted by code on the host
  side of the launcher (torch.sort, stable; masked rows get the key K and sort past every code), so
  each code owns a segment of the sorted order and counts[k] is its length (exact). Each segment is
  cut into pieces of at most PIECE_ROWS rows, and one program per (piece, dim tile) sums its rows in
  a fixed order: load balanced however skewed the code frequencies. Deterministic mode writes the
  piece sums to a scratch buffer and a second kernel adds each code's pieces in order (no float
  atomics, bitwise repeatable: the block sizes of these kernels are fixed, never autotuned);
  fast mode adds the piece sums into the outputs with one float atomic per piece and dim.

Registered as the custom op `vqdna::ema_stats_triton` (torch.library.triton_op).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.dispatch import triton_interpreter
from vqdna.kernels.triton.common import TORCH_DTYPES, AotVariant, device_guard, jit_function, signature

__all__ = ["ema_stats_triton"]


# Tile sizes. They are fixed (not autotuned): the sorted path's summation order follows from them,
# and deterministic mode must give the same bits in every process. Small under the interpreter,
# which also makes the tests cut segments into several pieces.
# (BLOCK_R, MAX_BLOCK_D, PIECE_ROWS, num_warps, SORTED_MIN_ROWS) on a GPU. Fast mode sorts when
# there are enough rows per code for atomic contention to dominate (a first guess, to be tuned on a
# GPU).
# 8 warps: at 4 the direct kernel's [64, 128] tile of 64-bit atomic addresses spilled 28-172 B.
GPU_TILES = (64, 128, 1024, 8, 1 << 15)
# Under the interpreter: small, and a low sort threshold so the tests run both fast-mode paths.
INTERPRETER_TILES = (32, 64, 64, 1, 256)
_BLOCK_R, _MAX_BLOCK_D, _PIECE_ROWS, _WARPS, _SORTED_MIN_ROWS = INTERPRETER_TILES if triton_interpreter() else GPU_TILES


def path(n: int, deterministic: bool) -> str:
    """Which kernels a call with n rows runs: "direct" (atomics per row) or "sorted" (fast mode:
    atomics per piece; deterministic mode: piece sums combined in order)."""
    return "direct" if not deterministic and n < _SORTED_MIN_ROWS else "sorted"


@triton.jit
def _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, row_ok, dims, dim_ok, D, HAS_PREV: tl.constexpr):
    """[BLOCK_R, BLOCK_D] float32 vectors of `rows` (int64): x, or 2 x - prev_codebook[prev_code]."""
    ok = row_ok[:, None] & dim_ok[None, :]
    v = tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_PREV:
        prev = tl.load(prev_codes_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        e = tl.load(prev_cb_ptr + prev[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        v = 2.0 * v - e
    return v


@triton.jit
def _ema_direct_kernel(
    x_ptr,  # [N, D] float32/bfloat16/float16
    codes_ptr,  # [N] int32
    mask_ptr,  # [N] bool (read when HAS_MASK)
    prev_codes_ptr,  # [N] int32 (read when HAS_PREV)
    prev_cb_ptr,  # [K', D] dtype of x (read when HAS_PREV)
    counts_ptr,  # [K] float32, zeroed
    sums_ptr,  # [K, D] float32, zeroed
    N,
    D,
    HAS_MASK: tl.constexpr,
    HAS_PREV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0)
    rows = rows.to(tl.int64)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    codes = tl.load(codes_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    v = _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, row_ok, dims, dim_ok, D, HAS_PREV)
    tl.atomic_add(sums_ptr + codes[:, None] * D + dims[None, :], v, mask=row_ok[:, None] & dim_ok[None, :], sem="relaxed")
    if pid_d == 0:
        tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_R], 1.0, tl.float32), mask=row_ok, sem="relaxed")


@triton.jit
def _piece_rows(p, piece_code_ptr, bounds_ptr, piece_end_ptr, K, PIECE_ROWS: tl.constexpr):
    """Code and sorted-row range [start, end) of piece p; an empty range for padding pieces."""
    code = tl.load(piece_code_ptr + p)
    valid = code < K
    c = tl.minimum(code, K - 1)
    seg_start = tl.load(bounds_ptr + c)
    seg_end = tl.load(bounds_ptr + c + 1)
    first_piece = tl.load(piece_end_ptr + c) - (seg_end - seg_start + PIECE_ROWS - 1) // PIECE_ROWS
    start = seg_start + (p - first_piece) * PIECE_ROWS
    end = tl.where(valid, tl.minimum(start + PIECE_ROWS, seg_end), start)
    return c, valid, start, end


@triton.jit
def _ema_piece_kernel(
    x_ptr,  # [N, D]
    order_ptr,  # [N] int64: row indices sorted by (masked) code, stable
    piece_code_ptr,  # [P_MAX] int64: code of each piece (K for padding pieces)
    bounds_ptr,  # [K + 1] int64: code k's segment of the sorted order is bounds[k] .. bounds[k+1]
    piece_end_ptr,  # [K] int64: code k's pieces end at piece_end[k] (cumulative piece counts)
    prev_codes_ptr,
    prev_cb_ptr,
    out_ptr,  # ATOMIC: sums [K, D] float32, zeroed; else partial sums [P_MAX, D] float32
    K,
    D,
    HAS_PREV: tl.constexpr,
    ATOMIC: tl.constexpr,
    PIECE_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p, pid_d = tl.program_id(0), tl.program_id(1)
    code, valid, start, end = _piece_rows(p, piece_code_ptr, bounds_ptr, piece_end_ptr, K, PIECE_ROWS)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(start, end, BLOCK_R):  # a fixed order: the sum is the same bits every run
        idx = i + tl.arange(0, BLOCK_R)
        in_piece = idx < end
        rows = tl.load(order_ptr + idx, mask=in_piece, other=0).to(tl.int64)
        acc += _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, in_piece, dims, dim_ok, D, HAS_PREV)
    total = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + code.to(tl.int64) * D + dims, total, mask=dim_ok & (dims * 0 + code < K), sem="relaxed")
    else:
        tl.store(out_ptr + p.to(tl.int64) * D + dims, total, mask=dim_ok)


@triton.jit
def _ema_combine_kernel(
    partial_ptr,  # [P_MAX, D] float32 piece sums
    piece_end_ptr,  # [K] int64
    bounds_ptr,  # [K + 1] int64
    sums_ptr,  # [K, D] float32 out (every element written)
    D,
    PIECE_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    code, pid_d = tl.program_id(0), tl.program_id(1)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    end = tl.load(piece_end_ptr + code)
    begin = end - (tl.load(bounds_ptr + code + 1) - tl.load(bounds_ptr + code) + PIECE_ROWS - 1) // PIECE_ROWS
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p in range(begin, end):  # the code's pieces in order: deterministic
        acc += tl.load(partial_ptr + p * D + dims, mask=dim_ok, other=0.0)
    tl.store(sums_ptr + code.to(tl.int64) * D + dims, acc, mask=dim_ok)


@triton_op("vqdna::ema_stats_triton", mutates_args=())
def ema_stats_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    mask: Optional[torch.Tensor],
    prev_codes: Optional[torch.Tensor],
    prev_codebook: Optional[torch.Tensor],
    num_codes: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] contiguous (float32/bfloat16/float16), codes [N] int32 in [0, num_codes), mask [N]
    bool or None, prev_codes [N] int32 + prev_codebook [K', D] (dtype of x) or None.
    Returns counts [K] and sums [K, D], float32 (docs/design.md §2.3). deterministic: no float atomics,
    bitwise repeatable run to run."""
    n, d = x.shape
    device = x.device
    has_mask, has_prev = mask is not None, prev_codes is not None
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(max(d, 1)))
    # Unused pointer arguments still need a tensor: x stands in for them.
    prev_codes_arg = prev_codes if has_prev else x
    prev_cb_arg = prev_codebook if has_prev else x

    if n == 0:
        return torch.zeros(num_codes, dtype=torch.float32, device=device), torch.zeros(num_codes, d, dtype=torch.float32, device=device)
    if path(n, deterministic) == "direct" and d > 0:
        counts = torch.zeros(num_codes, dtype=torch.float32, device=device)
        sums = torch.zeros(num_codes, d, dtype=torch.float32, device=device)
        grid = (triton.cdiv(n, _BLOCK_R), triton.cdiv(d, block_d))
        with device_guard(device):
            wrap_triton(_ema_direct_kernel)[grid](
                x, codes, mask if has_mask else x, prev_codes_arg, prev_cb_arg, counts, sums, n, d,
                HAS_MASK=has_mask, HAS_PREV=has_prev, BLOCK_R=_BLOCK_R, BLOCK_D=block_d, num_warps=_WARPS,
            )  # fmt: skip
        return counts, sums

    # Sorted path. Masked rows get the key num_codes: they sort past every segment.
    keys = codes if mask is None else torch.where(mask, codes, num_codes)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_codes + 1, dtype=keys.dtype, device=device))
    lengths = bounds[1:] - bounds[:-1]
    counts = lengths.to(torch.float32)  # exact: integer row counts
    piece_end = torch.cumsum((lengths + _PIECE_ROWS - 1) // _PIECE_ROWS, 0)
    # >= sum_k ceil(len_k / PIECE_ROWS) (at most min(K, N) segments are non-empty): no host sync.
    max_pieces = n // _PIECE_ROWS + min(num_codes, n)
    piece_code = torch.searchsorted(piece_end, torch.arange(max_pieces, device=device), right=True)
    if d == 0:
        return counts, torch.zeros(num_codes, 0, dtype=torch.float32, device=device)
    if deterministic:
        out = torch.empty(max_pieces, d, dtype=torch.float32, device=device)
        sums = torch.empty(num_codes, d, dtype=torch.float32, device=device)
    else:
        out = sums = torch.zeros(num_codes, d, dtype=torch.float32, device=device)
    grid = (max_pieces, triton.cdiv(d, block_d))
    with device_guard(device):
        wrap_triton(_ema_piece_kernel)[grid](
            x, order, piece_code, bounds, piece_end, prev_codes_arg, prev_cb_arg, out, num_codes, d,
            HAS_PREV=has_prev, ATOMIC=not deterministic, PIECE_ROWS=_PIECE_ROWS, BLOCK_R=_BLOCK_R, BLOCK_D=block_d,
            num_warps=_WARPS,
        )  # fmt: skip
        if deterministic:
            wrap_triton(_ema_combine_kernel)[(num_codes, triton.cdiv(d, block_d))](
                out, piece_end, bounds, sums, d, PIECE_ROWS=_PIECE_ROWS, BLOCK_D=block_d, num_warps=_WARPS,
            )  # fmt: skip
    return counts, sums


def aot_variants():
    """What `vqdna gpu-check` compiles: the three kernels with the GPU tile sizes, for every input dtype,
    mask / previous-level / atomic variant, at BLOCK_D = MAX_BLOCK_D (D >= 128) and the smallest
    BLOCK_D (D <= 16)."""
    block_r, max_block_d, piece_rows, warps, _ = GPU_TILES
    block_ds = (max_block_d, 16)
    direct, piece, combine = (jit_function(k) for k in (_ema_direct_kernel, _ema_piece_kernel, _ema_combine_kernel))
    for dtype in TORCH_DTYPES:
        ptr = f"*{dtype}"
        for block_d in block_ds:
            for has_mask in (False, True):
                for has_prev in (False, True):
                    consts = {"HAS_MASK": has_mask, "HAS_PREV": has_prev, "BLOCK_R": block_r, "BLOCK_D": block_d}
                    pointers = {"x_ptr": ptr, "codes_ptr": "*i32", "mask_ptr": "*i1" if has_mask else ptr,
                                "prev_codes_ptr": "*i32" if has_prev else ptr, "prev_cb_ptr": ptr,
                                "counts_ptr": "*fp32", "sums_ptr": "*fp32"}  # fmt: skip
                    yield AotVariant("ema_stats", "_ema_direct_kernel", direct, dtype,
                                     f"direct R{block_r} D{block_d}{' mask' if has_mask else ''}{' prev' if has_prev else ''}",
                                     signature(direct, pointers, consts), consts, warps, 1)  # fmt: skip
            for has_prev in (False, True):
                for atomic in (True, False):
                    consts = {"HAS_PREV": has_prev, "ATOMIC": atomic, "PIECE_ROWS": piece_rows, "BLOCK_R": block_r,
                              "BLOCK_D": block_d}  # fmt: skip
                    pointers = {"x_ptr": ptr, "order_ptr": "*i64", "piece_code_ptr": "*i64", "bounds_ptr": "*i64",
                                "piece_end_ptr": "*i64", "prev_codes_ptr": "*i32" if has_prev else ptr,
                                "prev_cb_ptr": ptr, "out_ptr": "*fp32"}  # fmt: skip
                    yield AotVariant("ema_stats", "_ema_piece_kernel", piece, dtype,
                                     f"sorted R{block_r} D{block_d}{' prev' if has_prev else ''}{' atomic' if atomic else ''}",
                                     signature(piece, pointers, consts, {"K": "i32", "D": "i32"}), consts, warps, 1)  # fmt: skip
        if dtype == "fp32":  # the combine kernel reads float32 piece sums whatever the input dtype
            for block_d in block_ds:
                consts = {"PIECE_ROWS": piece_rows, "BLOCK_D": block_d}
                pointers = {"partial_ptr": "*fp32", "piece_end_ptr": "*i64", "bounds_ptr": "*i64", "sums_ptr": "*fp32"}
                yield AotVariant("ema_stats", "_ema_combine_kernel", combine, "fp32", f"combine D{block_d}",
                                 signature(combine, pointers, consts), consts, warps, 1)  # fmt: skip
