"""Triton quantize (docs/design.md §2.1): lookup's one-pass search (`nearest_codes`, the same tiles, tie
and NaN rules) with an epilogue for the row tile it just searched: the chosen codebook rows are copied
to `quantized`, and the tile's loss sum (float64) and non-finite rows are added atomically to an
8-byte scratch each; a one-program kernel then writes sqdist_sum (float32, rounded once) and the
non-finite report. Nothing is read back on the host.

Registered as the custom op `vqdna::quantize_triton` (torch.library.triton_op), so torch.compile sees it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels import reference
from vqdna.kernels.ops.lookup.triton_kernel import (
    INTERPRETER_TILE,
    TILES,
    copy_code_rows,
    nearest_codes,
    search_aot_variants,
    search_constants,
    shared_bytes,
)
from vqdna.kernels.triton.common import (
    AotVariant,
    TORCH_DTYPES,
    autotune_configs,
    device_guard,
    jit_function,
    prune_for_device,
    signature,
    size_class,
)

__all__ = ["quantize_triton"]

# lookup's tiles: the epilogue runs after the search loop, when its operand tiles are dead, so it
# adds no live registers to the loop (`vqdna gpu-check` compiles every tile of both kernels).


@triton.autotune(
    configs=autotune_configs(TILES, INTERPRETER_TILE),
    key=["N_CLASS", "K", "D", "IEEE_FP32", "UPCAST"],
    prune_configs_by={"early_config_prune": prune_for_device("z_ptr", shared_bytes, TILES)},
    # the scratch sums accumulate across launches: the autotuner's trial runs must not add to them
    reset_to_zero=["sum_ptr", "bad_ptr"],
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _quantize_kernel(
    z_ptr,
    e_ptr,
    e_sqnorm_ptr,
    codes_ptr,
    q_ptr,
    dist_ptr,
    sum_ptr,  # float64 [1]: sum of dist, zero on entry
    bad_ptr,  # int64 [2]: (count of non-finite rows, max over them of N - row), zero on entry
    N,
    K,
    D,
    N_CLASS,  # size_class(N): only an autotuning key
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_ok, best_code, dist = nearest_codes(
        z_ptr, e_ptr, e_sqnorm_ptr, N, K, D, D, 0, 0, IEEE_FP32, UPCAST, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D
    )
    tl.store(codes_ptr + rows, best_code, mask=row_ok)
    tl.store(dist_ptr + rows, dist, mask=row_ok)

    copy_code_rows(z_ptr, e_ptr, q_ptr, rows, row_ok, best_code, D, EVEN_D, False, BLOCK_N, BLOCK_D)

    # dist is >= 0, +inf or NaN: `dist < inf` is the finite test. Padding rows add 0 and are not bad.
    tile_sum = tl.sum(tl.where(row_ok, dist, 0.0).to(tl.float64), axis=0)
    bad = row_ok & ~(dist < float("inf"))
    tl.atomic_add(sum_ptr, tile_sum)
    tl.atomic_add(bad_ptr, tl.sum(bad.to(tl.int64), axis=0))
    # the first bad row as a max (the scratch starts at 0, which then means "none")
    tl.atomic_max(bad_ptr + 1, tl.max(tl.where(bad, N - rows, 0).to(tl.int64), axis=0))


@triton.jit
def _quantize_finish_kernel(sum_ptr, bad_ptr, sqdist_sum_ptr, nonfinite_ptr, N):
    """One program: sqdist_sum = the float64 sum rounded once to float32; nonfinite = (count, first
    row or -1) from the scratch of _quantize_kernel."""
    tl.store(sqdist_sum_ptr, tl.load(sum_ptr).to(tl.float32))
    tl.store(nonfinite_ptr, tl.load(bad_ptr))
    last = tl.load(bad_ptr + 1)
    tl.store(nonfinite_ptr + 1, tl.where(last > 0, N - last, -1))


@triton_op("vqdna::quantize_triton", mutates_args=())
def quantize_triton(
    z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [N, D] contiguous, codebook [K, D] contiguous (same dtype: float32/bfloat16/float16),
    codebook_sqnorm [K] float32. Returns codes int32 [N], quantized [N, D] (dtype of z), dist float32
    [N], sqdist_sum float32 [] (float64 accumulation), nonfinite int64 [2] (docs/design.md §2.1).
    normalize: of l2norm(z) instead, normalised by torch before the kernel (one pass more over z)."""
    if normalize:
        z = reference.l2norm(z)
    n, d = z.shape
    k = codebook.shape[0]
    codes = torch.empty(n, dtype=torch.int32, device=z.device)
    quantized = torch.empty_like(z)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    sqdist_sum = torch.empty((), dtype=torch.float32, device=z.device)
    nonfinite = torch.empty(2, dtype=torch.int64, device=z.device)
    sum64 = torch.zeros(1, dtype=torch.float64, device=z.device)
    bad = torch.zeros(2, dtype=torch.int64, device=z.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    with device_guard(z.device):
        if n > 0:
            wrap_triton(_quantize_kernel)[grid](
                z, codebook, codebook_sqnorm, codes, quantized, dist, sum64, bad, n, k, d, size_class(n),
                **search_constants(z),
            )
        wrap_triton(_quantize_finish_kernel)[(1,)](sum64, bad, sqdist_sum, nonfinite, n)
    return codes, quantized, dist, sqdist_sum, nonfinite


def aot_variants():
    """What `vqdna gpu-check` compiles: the search kernel in every variant lookup's is compiled in
    (search_aot_variants), and the one-program finishing kernel."""
    yield from search_aot_variants(
        "quantize", _quantize_kernel, TILES,
        {"codes_ptr": "*i32", "q_ptr": "*dtype", "dist_ptr": "*fp32", "sum_ptr": "*fp64", "bad_ptr": "*i64"},
    )  # fmt: skip
    fn = jit_function(_quantize_finish_kernel)
    sig = signature(fn, {"sum_ptr": "*fp64", "bad_ptr": "*i64", "sqdist_sum_ptr": "*fp32", "nonfinite_ptr": "*i64"}, {})
    yield AotVariant("quantize", fn.__name__, fn, "fp64", "1 program", sig, {}, num_warps=1, num_stages=1)
