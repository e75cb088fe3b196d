"""Triton EMA statistics (DESIGN 2.3): per-code counts [K] and vector sums [K, D] in float32.

Two modes: fast (float atomics into zeroed outputs, one program per tile of rows x dims) and
deterministic (no float atomics: rows sorted by code with a stable sort, then one program per
(code, dim tile) sums its segment in a fixed order; bitwise repeatable run to run).
Registered as `vqdna::ema_stats_triton`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["ema_stats_triton"]


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, row_ok, dims, dim_ok, D, HAS_PREV: tl.constexpr):
    """[BLOCK_R, BLOCK_D] float32 vectors of `rows`: x, or 2 x - prev_codebook[prev_code]."""
    ok = row_ok[:, None] & dim_ok[None, :]
    v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_PREV:
        prev = tl.load(prev_codes_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        e = tl.load(prev_cb_ptr + prev[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        v = 2.0 * v - e
    return v


@triton.jit
def _ema_stats_atomic_kernel(
    x_ptr, codes_ptr, mask_ptr, prev_codes_ptr, prev_cb_ptr, counts_ptr, sums_ptr, N, D,
    HAS_MASK: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    codes = tl.load(codes_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    v = _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, row_ok, dims, dim_ok, D, HAS_PREV)
    tl.atomic_add(sums_ptr + codes[:, None] * D + dims[None, :], v, mask=row_ok[:, None] & dim_ok[None, :])
    if pid_d == 0:
        tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_R], 1.0, tl.float32), mask=row_ok)


@triton.jit
def _ema_stats_segment_kernel(
    x_ptr, order_ptr, starts_ptr, mask_ptr, prev_codes_ptr, prev_cb_ptr, counts_ptr, sums_ptr, D,
    HAS_MASK: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    code, pid_d = tl.program_id(0), tl.program_id(1)
    start = tl.load(starts_ptr + code)
    end = tl.load(starts_ptr + code + 1)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(start, end, BLOCK_R):
        idx = i + tl.arange(0, BLOCK_R)
        in_seg = idx < end
        rows = tl.load(order_ptr + idx, mask=in_seg, other=0)
        row_ok = in_seg
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=in_seg, other=0) != 0)
        v = _row_vectors(x_ptr, prev_codes_ptr, prev_cb_ptr, rows, row_ok, dims, dim_ok, D, HAS_PREV)
        acc += tl.sum(v, axis=0)
        count += row_ok.to(tl.float32)
    tl.store(sums_ptr + code.to(tl.int64) * D + dims, acc, mask=dim_ok)
    if pid_d == 0:
        tl.store(counts_ptr + code, tl.sum(count, axis=0))


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
    bool or None, prev_codes [N] int32 + prev_codebook [K', D] or None. Returns counts [K] and
    sums [K, D], float32 (DESIGN 2.3)."""
    n, d = x.shape
    has_mask, has_prev = mask is not None, prev_codes is not None
    block_d = min(128, triton.next_power_of_2(max(d, 1)))
    # Unused pointer arguments still need a tensor: x stands in for them.
    mask_arg = mask if has_mask else x
    prev_codes_arg = prev_codes if has_prev else x
    prev_cb_arg = prev_codebook if has_prev else x
    if not deterministic:
        counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
        sums = torch.zeros(num_codes, d, dtype=torch.float32, device=x.device)
        if n == 0:
            return counts, sums
        block_r = 32
        grid = (triton.cdiv(n, block_r), triton.cdiv(d, block_d))
        wrap_triton(_ema_stats_atomic_kernel)[grid](
            x, codes, mask_arg, prev_codes_arg, prev_cb_arg, counts, sums, n, d,
            HAS_MASK=has_mask, HAS_PREV=has_prev, BLOCK_R=block_r, BLOCK_D=block_d,
        )
        return counts, sums
    counts = torch.empty(num_codes, dtype=torch.float32, device=x.device)
    sums = torch.empty(num_codes, d, dtype=torch.float32, device=x.device)
    sorted_codes, order = torch.sort(codes.long(), stable=True)
    boundaries = torch.arange(num_codes + 1, device=x.device)
    starts = torch.searchsorted(sorted_codes, boundaries).to(torch.int32)
    grid = (num_codes, triton.cdiv(d, block_d))
    wrap_triton(_ema_stats_segment_kernel)[grid](
        x, order.to(torch.int32), starts, mask_arg, prev_codes_arg, prev_cb_arg, counts, sums, d,
        HAS_MASK=has_mask, HAS_PREV=has_prev, BLOCK_R=32, BLOCK_D=block_d,
    )
    return counts, sums


@ema_stats_triton.register_fake
def _(x, codes, mask, prev_codes, prev_codebook, num_codes, deterministic):
    return x.new_empty(num_codes, dtype=torch.float32), x.new_empty(num_codes, x.shape[1], dtype=torch.float32)
