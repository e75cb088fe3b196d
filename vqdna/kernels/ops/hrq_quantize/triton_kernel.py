"""Triton HRQ residual doubling (docs/design.md §2.2): one launch does every level for a tile of rows.

Level 0 searches C_0 with Z_0; level l >= 1 gathers the previous level's chosen code rows (the codes
stay in registers), forms H_l = 2 Z_l - C_{l-1}[M_{l-1}] on chip, rounded to the input dtype exactly
as the reference rounds `2.0 * z - prev_embedding`, and searches C_l with it; H_l never reaches
global memory (its [BLOCK_N, BLOCK_D] chunks are recomputed for every K tile: Z_l is in L2 by then
and the codebooks always are). The cumulative means of the chosen code embeddings are summed in
float32 in level order and rounded once, as in the reference.

Registered as the custom op `vqdna::hrq_quantize_triton` (torch.library.triton_op).

Roofline note (H100, N = 2^20, D = 384, K = 64 + 512, bf16): the search is 2 N D sum_l K_l = 464
GFLOP (~0.47 ms at the dense bf16 peak) but the kernel must read Z (1.6 GB) and write zhat_levels
(1.6 GB): ~1 ms at 3.35 TB/s, so it is memory bound there and is best judged by bandwidth.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.dispatch import triton_interpreter
from vqdna.kernels.reference import nonfinite_report
from vqdna.kernels.triton.common import (
    TORCH_DTYPES,
    AotVariant,
    HALF,
    Tile,
    autotune_configs,
    chunk_masks,
    device_guard,
    int_tensor_on,
    jit_function,
    pipelined_shared_bytes,
    prune_for_device,
    running_argmin,
    signature,
    size_class,
)

__all__ = ["hrq_quantize_triton"]

# Levels fused into one launch (one pointer argument each). More levels run as further launches
# that pick up the earlier levels' codes from the codes output. Two: the paper's two taps are one
# launch, and a third or fourth level unrolled into the same launch spilled 36-870 B on every tile
# (vqdna gpu-check, Triton 3.9); its extra launch re-reads the earlier codes, not Z.
_LEVELS_PER_LAUNCH = 2


# The tiles the autotuner may pick on a GPU (common.Tile: BLOCK_N, BLOCK_K, BLOCK_D, warps, stages,
# dtypes, only without the dimension mask, architectures). `vqdna gpu-check` compiles each for what it
# is declared for, under Triton 3.6 (the GPU machines') and 3.9, and fails on a 16-bit spill. Forming
# H on chip costs registers the plain lookup does not spend (the gathered previous code and two
# roundings per element), so BLOCK_D is 32 or 16 with 8 warps: every 64-wide 16-bit tile spilled
# 100-1,800 B, 128 x 64 x 32 and the 4- and 2-warp small tiles 4-400 B in some launch (Triton 3.6 or
# 3.9, sm_80 or sm_90).
TILES = [
    Tile(128, 128, 16, 8, 3, HALF, even_d_only=True),
    Tile(64, 128, 32, 8, 3, HALF, even_d_only=True),  # K = 512: half the H recomputation of BLOCK_K = 64
    Tile(64, 64, 32, 8, 3, HALF, even_d_only=True),
    Tile(64, 64, 32, 8, 2),
]
INTERPRETER_TILE = Tile(32, 64, 32, 1, 1)  # the interpreter runs on the CPU: one small tile


def shared_bytes(tile: Tile, dtype_bytes: int) -> int:
    """Shared memory a tile needs (the pruning rule; gpu-check compares it with the compiled value):
    the pipelined Z, previous-code and codebook tiles."""
    return pipelined_shared_bytes(tile, dtype_bytes, operand_rows=2 * tile.block_n + tile.block_k)


@triton.jit
def _pick(j: tl.constexpr, a, b):
    """The j-th of two values (j a compile-time level index)."""
    if j == 0:
        return a
    else:
        return b


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """float32 x rounded to dtype, to nearest even (what .to() does on a GPU). The Triton interpreter
    truncates float32 -> bfloat16, so there the rounding is done on the bits first."""
    if EMULATE_BF16_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.autotune(
    configs=autotune_configs(TILES, INTERPRETER_TILE),
    key=["N_CLASS", "D", "K_MAX", "NUM_LEVELS", "HAS_EARLIER", "CODES_ONLY", "IEEE_FP32", "UPCAST"],
    prune_configs_by={"early_config_prune": prune_for_device("z0_ptr", shared_bytes, TILES)},
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _hrq_kernel(
    z0_ptr,  # Z of levels FIRST .. FIRST + NUM_LEVELS - 1, each [N, D] (unused slots: any tensor)
    z1_ptr,
    e_ptr,  # [sum K_l, D] packed codebooks, dtype of Z
    e_sqnorm_ptr,  # [sum K_l] float32
    offsets_ptr,  # [L + 1] int32: level l's codes are the rows offsets[l] .. offsets[l + 1] - 1
    codes_ptr,  # [L, N] int32 out (level-local codes)
    levels_ptr,  # [L, N, D] out, dtype of Z (unused with CODES_ONLY: any tensor)
    sqdist_ptr,  # [L, N] float32 out: ||Z_l - zhat_levels[l]||^2 per row (unused with CODES_ONLY)
    N,
    D,
    K_MAX,  # largest K_l of this launch: only an autotuning key
    N_CLASS,  # size_class(N): only an autotuning key
    FIRST,  # first level of this launch
    NUM_LEVELS: tl.constexpr,  # levels in this launch, 1 .. _LEVELS_PER_LAUNCH
    HAS_EARLIER: tl.constexpr,  # FIRST > 0: earlier levels' codes are read from codes_ptr
    CODES_ONLY: tl.constexpr,  # write the codes only: no zhat_levels, no sqdist (tokenization)
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,  # bfloat16 under the interpreter (see the launcher)
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no dimension mask (the masked loads cost registers)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # 64-bit offsets: L * N * D can exceed 2^31
    # Z tiles: a 64-bit base per program, 32-bit offsets inside the tile (fewer registers).
    z_offs = tl.arange(0, BLOCK_N)[:, None] * D
    tile_base = pid.to(tl.int64) * BLOCK_N * D

    # Packed-codebook row of the previous level's chosen code, per row (used by levels >= 1).
    prev_row = tl.zeros([BLOCK_N], dtype=tl.int64)
    if HAS_EARLIER:
        prev_row = tl.load(codes_ptr + (FIRST - 1) * N + rows64, mask=row_ok, other=0).to(tl.int64)
        prev_row += tl.load(offsets_ptr + FIRST - 1)
    # The chosen packed rows of this launch's levels, kept for the cumulative means.
    row0 = prev_row
    row1 = prev_row

    e_offs = tl.arange(0, BLOCK_K)[:, None] * D
    for j in tl.static_range(NUM_LEVELS):
        z_tile = _pick(j, z0_ptr, z1_ptr) + tile_base
        k_start = tl.load(offsets_ptr + FIRST + j)
        k_end = tl.load(offsets_ptr + FIRST + j + 1)
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < k_end
            e_tile = e_ptr + tl.cast(k0, tl.int64) * D
            dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                ok, e_ok = chunk_masks(row_ok, code_ok, dims, D, EVEN_D)
                h = tl.load(z_tile + z_offs + dims[None, :], mask=ok, other=0.0)
                if HAS_EARLIER or j > 0:
                    # H = 2 Z - C_prev[M_prev], rounded like the reference's `2.0 * z - prev`: 2 Z is
                    # rounded to the dtype first (it can overflow in float16), then the difference.
                    prev = tl.load(e_ptr + prev_row[:, None] * D + dims[None, :], mask=ok, other=0.0)
                    twice = _round(h.to(tl.float32) * 2.0, h.dtype, UPCAST)
                    h = _round(twice.to(tl.float32) - prev.to(tl.float32), h.dtype, UPCAST)
                et = tl.load(e_tile + e_offs + dims[None, :], mask=e_ok, other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                    et = et.to(tl.float32)
                if IEEE_FP32 or UPCAST:
                    dot = tl.dot(h, tl.trans(et), dot, input_precision="ieee")
                else:
                    dot = tl.dot(h, tl.trans(et), dot)
            e_sqnorm = tl.load(e_sqnorm_ptr + codes, mask=code_ok, other=0.0)
            best, best_code = running_argmin(best, best_code, dot, e_sqnorm, code_ok, k0 - k_start)
        tl.store(codes_ptr + (FIRST + j) * N + rows64, best_code, mask=row_ok)
        prev_row = best_code.to(tl.int64) + k_start
        if j == 0:
            row0 = prev_row
        else:
            row1 = prev_row

    if not CODES_ONLY:
        # Cumulative means: sum the chosen code rows in level order in float32, divide (correctly
        # rounded, as torch divides), round once to the output dtype. While Z_l's chunk is in cache,
        # the commitment loss's ||Z_l - zhat_levels[l]||^2 of the rounded output (float32).
        sq0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        sq1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (dims < D)[None, :]
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            if HAS_EARLIER:
                for m in range(0, FIRST):
                    r = tl.load(codes_ptr + m * N + rows64, mask=row_ok, other=0).to(tl.int64) + tl.load(offsets_ptr + m)
                    acc += tl.load(e_ptr + r[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            for j in tl.static_range(NUM_LEVELS):
                r = _pick(j, row0, row1)
                acc += tl.load(e_ptr + r[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
                count = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32) * (FIRST + j + 1)
                mean = _round(tl.div_rn(acc, count), levels_ptr.dtype.element_ty, UPCAST)
                out = levels_ptr + ((FIRST + j) * N + rows64)[:, None] * D + dims[None, :]
                tl.store(out, mean, mask=ok)
                z = tl.load(_pick(j, z0_ptr, z1_ptr) + tile_base + z_offs + dims[None, :], mask=ok, other=0.0)
                diff = z.to(tl.float32) - mean.to(tl.float32)
                part = tl.sum(tl.where(ok, diff * diff, 0.0), axis=1)
                if j == 0:
                    sq0 += part
                else:
                    sq1 += part
        for j in tl.static_range(NUM_LEVELS):
            tl.store(sqdist_ptr + (FIRST + j) * N + rows64, _pick(j, sq0, sq1), mask=row_ok)


@triton_op("vqdna::hrq_quantize_triton", mutates_args=())
def hrq_quantize_triton(
    zs: list[torch.Tensor],
    codebooks: torch.Tensor,
    codebook_sqnorms: torch.Tensor,
    codebook_sizes: list[int],
    codes_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """zs: L tensors [N, D] contiguous (float32/bfloat16/float16); codebooks [sum K_l, D] contiguous,
    same dtype, level l's rows at offset sum_{m<l} K_m; codebook_sqnorms [sum K_l] float32;
    codebook_sizes [L] = K_l. Returns codes int32 [L, N] (level-local), zhat_levels [L, N, D] in
    the dtype of zs, sqdist [L, N] and sqdist_sum [L] float32, nonfinite int64 [L, 2]
    (docs/design.md §2.2, reference.hrq_level_losses); with codes_only, codes and four empty
    tensors. The per-level tensors are read in place, never stacked. The kernel writes the per-row
    sqdist; its sum and the non-finite report are reductions over those L N floats (1/D of zhat)."""
    n_levels = len(zs)
    n, d = zs[0].shape
    device, dtype = zs[0].device, zs[0].dtype
    codes = torch.empty(n_levels, n, dtype=torch.int32, device=device)
    if codes_only:
        levels = torch.empty(0, dtype=dtype, device=device)
        sqdist = torch.empty(0, dtype=torch.float32, device=device)
    else:
        levels = torch.empty(n_levels, n, d, dtype=dtype, device=device)
        sqdist = torch.empty(n_levels, n, dtype=torch.float32, device=device)
    if n > 0 and codes_only:  # one-element stand-ins for the pointers the kernel then never reads or writes
        _launch(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, torch.empty(1, dtype=dtype, device=device),
                torch.empty(1, dtype=torch.float32, device=device), True)
    elif n > 0:
        _launch(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, levels, sqdist, False)
    if codes_only:
        return codes, levels, sqdist, torch.empty(0, dtype=torch.float32, device=device), \
            torch.empty(0, dtype=torch.int64, device=device)
    return codes, levels, sqdist, sqdist.double().sum(-1).float(), nonfinite_report(sqdist)


def _launch(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, levels, sqdist, codes_only):
    """The kernel launches of hrq_quantize_triton (n > 0), _LEVELS_PER_LAUNCH levels each."""
    n_levels = len(zs)
    n, d = zs[0].shape
    device, dtype = zs[0].device, zs[0].dtype
    bounds = [0]
    for k in codebook_sizes:
        bounds.append(bounds[-1] + int(k))
    offsets = int_tensor_on(bounds, device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    for first in range(0, n_levels, _LEVELS_PER_LAUNCH):
        group = list(zs[first : first + _LEVELS_PER_LAUNCH])
        num = len(group)
        group += [group[0]] * (_LEVELS_PER_LAUNCH - num)  # unused pointer slots
        with device_guard(device):
            wrap_triton(_hrq_kernel)[grid](
                group[0],
                group[1],
                codebooks,
                codebook_sqnorms,
                offsets,
                codes,
                levels,
                sqdist,
                n,
                d,
                max(int(k) for k in codebook_sizes[first : first + num]),
                size_class(n),
                first,
                NUM_LEVELS=num,
                HAS_EARLIER=first > 0,
                CODES_ONLY=codes_only,
                IEEE_FP32=dtype == torch.float32,
                # The Triton interpreter's tl.dot reads bfloat16 as raw bits; products of bf16 values are
                # exact in float32, so upcasting there computes what the tensor cores compute on a GPU.
                # It also truncates float32 -> bfloat16, so the kernel rounds to nearest even by hand.
                UPCAST=dtype == torch.bfloat16 and triton_interpreter(),
            )


def aot_variants():
    """What `vqdna gpu-check` compiles: every declared tile for each dtype it is declared for, with and
    without the dimension mask where allowed, for every NUM_LEVELS of a launch, first launch or later,
    with the zhat/loss epilogue and codes-only."""
    fn = jit_function(_hrq_kernel)
    level_variants = [(n, has_earlier) for has_earlier in (False, True) for n in range(1, _LEVELS_PER_LAUNCH + 1)]
    for dtype, torch_dtype in TORCH_DTYPES.items():
        for tile in TILES:
            if dtype not in tile.dtypes:
                continue
            for even_d in (True, False) if not tile.even_d_only else (True,):
                for (num_levels, has_earlier), codes_only in itertools.product(level_variants, (False, True)):
                    consts = {"NUM_LEVELS": num_levels, "HAS_EARLIER": has_earlier, "CODES_ONLY": codes_only,
                              "IEEE_FP32": torch_dtype == torch.float32, "UPCAST": False, "EVEN_D": even_d,
                              "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "BLOCK_D": tile.block_d}  # fmt: skip
                    ptr = f"*{dtype}"
                    pointers = {f"z{i}_ptr": ptr for i in range(_LEVELS_PER_LAUNCH)}
                    pointers.update(e_ptr=ptr, e_sqnorm_ptr="*fp32", offsets_ptr="*i32", codes_ptr="*i32", levels_ptr=ptr,
                                    sqdist_ptr="*fp32")
                    label = (f"{tile.label} L{num_levels}{' earlier' if has_earlier else ''}{' codes-only' if codes_only else ''}"
                             f"{'' if even_d else ' masked-D'}")
                    yield AotVariant("hrq_quantize", "_hrq_kernel", fn, dtype, label, signature(fn, pointers, consts),
                                     consts, tile.num_warps, tile.num_stages,
                                     shared_bytes(tile, torch_dtype.itemsize), tile.archs)  # fmt: skip
