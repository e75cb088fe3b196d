"""Triton nearest-code lookup (DESIGN 2.1): one fused kernel, distance tiles from tl.dot and a running
(min, argmin) per row across K tiles; the N x K distance matrix never reaches global memory.

Registered as the custom op `vqdna::lookup_triton` (torch.library.triton_op), so torch.compile sees it.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.dispatch import triton_interpreter

__all__ = ["lookup_triton"]


def _configs():
    if triton_interpreter():
        # The interpreter runs on the CPU: one small tile keeps the tests fast.
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=1)]
    configs = []
    for block_n, block_k, block_d, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (256, 128, 64, 8, 3),
        (64, 64, 32, 4, 2),
        (32, 32, 32, 2, 2),
    ]:
        configs.append(
            triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)
        )
    return configs


@triton.autotune(configs=_configs(), key=["K", "D", "IEEE_FP32", "UPCAST"])
@triton.jit
def _lookup_kernel(
    z_ptr,
    e_ptr,
    e_sqnorm_ptr,
    codes_ptr,
    dist_ptr,
    N,
    K,
    D,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * D  # 64-bit offsets: N * D can exceed 2^31

    z_sqnorm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        zt = tl.load(z_rows + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
        z_sqnorm += tl.sum(zt * zt, axis=1)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        e_rows = e_ptr + codes.to(tl.int64)[:, None] * D
        dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = (dims < D)[None, :]
            zt = tl.load(z_rows + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
            et = tl.load(e_rows + dims[None, :], mask=code_ok[:, None] & dim_ok, other=0.0)
            if UPCAST:
                zt = zt.to(tl.float32)
                et = et.to(tl.float32)
            if IEEE_FP32 or UPCAST:
                dot = tl.dot(zt, tl.trans(et), dot, input_precision="ieee")
            else:
                dot = tl.dot(zt, tl.trans(et), dot)
        e_sqnorm = tl.load(e_sqnorm_ptr + codes, mask=code_ok, other=0.0)
        scores = e_sqnorm[None, :] - 2.0 * dot
        # Padding codes and NaN scores must never win; ties resolve to the leftmost (smallest) code.
        scores = tl.where(code_ok[None, :] & (scores == scores), scores, float("inf"))
        tile_best, tile_code = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an equal score in a later tile keeps the earlier code
        best = tl.where(better, tile_best, best)
        best_code = tl.where(better, tile_code + k0, best_code)

    dist = best + z_sqnorm
    dist = tl.where(dist < 0.0, 0.0, dist)  # clamp, but keep NaN (a non-finite row must show)
    tl.store(codes_ptr + rows, best_code, mask=row_ok)
    tl.store(dist_ptr + rows, dist, mask=row_ok)


@triton_op("vqdna::lookup_triton", mutates_args=())
def lookup_triton(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D] contiguous, codebook [K, D] contiguous (same dtype: float32/bfloat16/float16),
    codebook_sqnorm [K] float32. Returns codes int32 [N], dist float32 [N] (DESIGN 2.1)."""
    n, d = z.shape
    k = codebook.shape[0]
    codes = torch.empty(n, dtype=torch.int32, device=z.device)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return codes, dist

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(_lookup_kernel)[grid](
        z,
        codebook,
        codebook_sqnorm,
        codes,
        dist,
        n,
        k,
        d,
        IEEE_FP32=z.dtype == torch.float32,
        # The Triton interpreter's tl.dot reads bfloat16 as raw bits; products of bf16 values are
        # exact in float32, so upcasting there computes what the tensor cores compute on a GPU.
        UPCAST=z.dtype == torch.bfloat16 and triton_interpreter(),
    )
    return codes, dist


@lookup_triton.register_fake
def _(z, codebook, codebook_sqnorm):
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int32), z.new_empty(n, dtype=torch.float32)
