"""Triton HRQ residual doubling (DESIGN 2.2): one launch does every level for a tile of rows.

Level 0 searches C_0 with Z_0; level l >= 1 gathers the previous level's chosen code rows (the codes
are in registers), forms H_l = 2 Z_l - C_{l-1}[M_{l-1}] in float32 on chip, rounds it to the input
dtype (as the reference does) and searches C_l with it; H_l never reaches global memory. The
cumulative means of the chosen code embeddings are accumulated in float32 and rounded once.
Registered as `vqdna::hrq_quantize_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["hrq_quantize_triton"]


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs():
    if _interpreter():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bk, bd, w, s in [
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (128, 128, 32, 4, 4),
            (64, 64, 32, 4, 2),
        ]
    ]


@triton.autotune(configs=_configs(), key=["D", "L", "IEEE_FP32", "UPCAST"])
@triton.jit
def _hrq_kernel(
    z_ptr,  # [L, N, D] stacked levels
    e_ptr,  # [sum K_l, D] packed codebooks
    e_sqnorm_ptr,  # [sum K_l] float32
    offsets_ptr,  # [L + 1] int32: level l's codes are rows offsets[l] .. offsets[l+1]
    codes_ptr,  # [L, N] int32 out
    levels_ptr,  # [L, N, D] out (dtype of z)
    N,
    D,
    L: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    prev_code = tl.zeros([BLOCK_N], dtype=tl.int64)  # global row of the previous level's code
    for level in tl.static_range(L):
        z_rows = z_ptr + (level * N + rows64)[:, None] * D
        k_start = tl.load(offsets_ptr + level)
        k_end = tl.load(offsets_ptr + level + 1)
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < k_end
            e_rows = e_ptr + codes.to(tl.int64)[:, None] * D
            dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_ok = (dims < D)[None, :]
                h = tl.load(z_rows + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
                if level > 0:
                    prev = tl.load(e_ptr + prev_code[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
                    h = (2.0 * h.to(tl.float32) - prev.to(tl.float32)).to(z_ptr.dtype.element_ty)
                et = tl.load(e_rows + dims[None, :], mask=code_ok[:, None] & dim_ok, other=0.0)
                if UPCAST:  # the interpreter's tl.dot misreads bfloat16 (see triton/lookup.py)
                    h = h.to(tl.float32)
                    et = et.to(tl.float32)
                if IEEE_FP32 or UPCAST:
                    dot = tl.dot(h, tl.trans(et), dot, input_precision="ieee")
                else:
                    dot = tl.dot(h, tl.trans(et), dot)
            e_sqnorm = tl.load(e_sqnorm_ptr + codes, mask=code_ok, other=0.0)
            scores = e_sqnorm[None, :] - 2.0 * dot
            scores = tl.where(code_ok[None, :] & (scores == scores), scores, float("inf"))
            tile_best, tile_code = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_code = tl.where(better, tile_code + (k0 - k_start), best_code)
        tl.store(codes_ptr + level * N + rows, best_code, mask=row_ok)
        prev_code = best_code.to(tl.int64) + k_start

    # Cumulative means, from the codes this program just wrote (summed in level order in float32).
    tl.debug_barrier()
    for level in tl.static_range(L):
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (dims < D)[None, :]
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for m in tl.static_range(level + 1):
                code = tl.load(codes_ptr + m * N + rows, mask=row_ok, other=0).to(tl.int64) + tl.load(offsets_ptr + m)
                acc += tl.load(e_ptr + code[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            out = levels_ptr + (level * N + rows64)[:, None] * D + dims[None, :]
            tl.store(out, (acc / (level + 1)).to(levels_ptr.dtype.element_ty), mask=ok)


@triton_op("vqdna::hrq_quantize_triton", mutates_args=())
def hrq_quantize_triton(
    zs: list[torch.Tensor], codebooks: torch.Tensor, codebook_sqnorms: torch.Tensor, codebook_sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """zs: L tensors [N, D] (float32/bfloat16/float16); codebooks [sum K_l, D] same dtype;
    codebook_sqnorms [sum K_l] float32. Returns codes int32 [L, N] (level-local) and zhat_levels
    [L, N, D] (DESIGN 2.2)."""
    n_levels = len(zs)
    n, d = zs[0].shape
    codes = torch.empty(n_levels, n, dtype=torch.int32, device=zs[0].device)
    levels = torch.empty(n_levels, n, d, dtype=zs[0].dtype, device=zs[0].device)
    if n == 0:
        return codes, levels
    stacked = torch.stack(zs)  # one base pointer for the kernel; cheap next to the search
    offsets = torch.tensor([0, *torch.tensor(codebook_sizes).cumsum(0).tolist()], dtype=torch.int32, device=zs[0].device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(_hrq_kernel)[grid](
        stacked, codebooks, codebook_sqnorms, offsets, codes, levels, n, d,
        L=n_levels,
        IEEE_FP32=zs[0].dtype == torch.float32,
        UPCAST=zs[0].dtype == torch.bfloat16 and _interpreter(),
    )
    return codes, levels


@hrq_quantize_triton.register_fake
def _(zs, codebooks, codebook_sqnorms, codebook_sizes):
    n, d = zs[0].shape
    return zs[0].new_empty(len(zs), n, dtype=torch.int32), zs[0].new_empty(len(zs), n, d)
