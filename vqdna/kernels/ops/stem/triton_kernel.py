"""Triton fused stem (docs/design.md §2.5): gather-sum over base ids, LayerNorm and exact GELU in one kernel.

One program per tile of BLOCK_T positions (flattened over [B, L]) and the whole feature row
(BLOCK_D = next power of two >= D): for each of the W taps it loads the tile's base ids and gathers
the matching rows of the [W, 5, D] weight table (a few KB, L1/L2-resident) into a float32
accumulator; LayerNorm statistics are row reductions of that on-chip tile, and only the activated
row is written, once, in the output dtype. The one-hot input and the pre-activation never exist in
global memory.

Ids outside 0..5 (which the wrapper rejects before launching unless its check is switched off, as
under torch.compile) make every position whose window holds one NaN, never an out-of-bounds read.

Registered as the custom op `vqdna::stem_triton` (torch.library.triton_op).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.dispatch import triton_interpreter
from vqdna.kernels.triton.common import TORCH_DTYPES, AotVariant, device_guard, jit_function, signature

__all__ = ["stem_triton"]


@triton.jit
def _stem_kernel(
    ids_ptr,
    table_ptr,
    bias_ptr,
    ln_w_ptr,
    ln_b_ptr,
    out_ptr,
    N,
    L,
    D,
    eps,
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    HALF: tl.constexpr = W // 2
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # 64-bit: N * D can exceed 2^31
    pos_ok = pos < N
    t = pos % L
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D

    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc += tl.load(bias_ptr + dims, mask=dim_ok, other=0.0)[None, :]
    bad = tl.zeros([BLOCK_T], dtype=tl.int1)
    for j in range(W):  # a loop, not unrolled: W taps of gathered rows unrolled spilled at W >= 9
        s = t + (j - HALF)
        inside = pos_ok & (s >= 0) & (s < L)
        # The pad id (5) and off-edge taps add nothing: their gather is masked to 0.
        x = tl.load(ids_ptr + pos + (j - HALF), mask=inside, other=5).to(tl.int64)
        bad = bad | (x < 0) | (x > 5)
        base = inside & (x >= 0) & (x < 5)
        rows = table_ptr + (j * 5 + x) * D
        acc += tl.load(rows[:, None] + dims[None, :], mask=base[:, None] & dim_ok[None, :], other=0.0)

    mean = tl.sum(acc, axis=1) / D  # padded lanes of acc are 0
    centred = tl.where(dim_ok[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.load(ln_w_ptr + dims, mask=dim_ok, other=0.0)
    b = tl.load(ln_b_ptr + dims, mask=dim_ok, other=0.0)
    y = centred * rstd[:, None] * g[None, :] + b[None, :]
    y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    y = tl.where(bad[:, None], float("nan"), y)
    if ROUND_BF16:
        # Round to nearest even by hand (the interpreter's float32 -> bfloat16 cast truncates); the
        # cast below is then exact. NaN and Inf keep their class.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    out = out_ptr + pos[:, None] * D + dims[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=pos_ok[:, None] & dim_ok[None, :])


def _tile(d: int, interpreter: bool = None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for feature size d (on a GPU unless `interpreter`, which
    defaults to whether the Triton interpreter is on)."""
    block_d = triton.next_power_of_2(max(d, 1))
    if triton_interpreter() if interpreter is None else interpreter:
        # The interpreter runs every op as one numpy call over the tile: big tiles, few programs.
        return max(1, min(256, 16384 // block_d)), block_d, 1
    # ~16 fp32 accumulator values per thread at 4-8 warps; positions fill what D leaves.
    warps = 4 if block_d <= 512 else 8
    return max(1, min(64, (16 * 32 * warps) // block_d)), block_d, warps


@triton_op("vqdna::stem_triton", mutates_args=())
def stem_triton(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """ids [B, L] contiguous uint8/int32/int64; weight [D, 5, W] float32 (W odd); bias, ln_weight,
    ln_bias [D] float32 contiguous. Returns GELU(LayerNorm(gather-sum)) [B, L, D] in out_dtype."""
    batch, length = ids.shape
    d, _, width = weight.shape
    out = torch.empty(batch, length, d, dtype=out_dtype, device=ids.device)
    n = batch * length
    if n == 0:
        return out
    table = weight.permute(2, 1, 0).contiguous()  # [W, 5, D]: one tap's base row is contiguous in D
    block_t, block_d, warps = _tile(d)
    with device_guard(ids.device):
        wrap_triton(_stem_kernel)[(triton.cdiv(n, block_t),)](
            ids, table, bias, ln_weight, ln_bias, out, n, length, d, ln_eps,
            W=width, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
            ROUND_BF16=out_dtype == torch.bfloat16 and triton_interpreter(),
        )  # fmt: skip
    return out


def aot_variants():
    """What `vqdna gpu-check` compiles: the GPU tile of each feature size for every output dtype and
    kernel width: D = 384, 64 and 1030 (a padded row), W = 5, 7, 9 and 33."""
    fn = jit_function(_stem_kernel)
    for d in (384, 64, 1030):
        block_t, block_d, warps = _tile(d, interpreter=False)
        for width in (5, 7, 9, 33):
            for dtype in TORCH_DTYPES:
                consts = {"W": width, "BLOCK_T": block_t, "BLOCK_D": block_d, "ROUND_BF16": False}
                pointers = {"ids_ptr": "*u8", "table_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32",
                            "ln_b_ptr": "*fp32", "out_ptr": f"*{dtype}"}  # fmt: skip
                yield AotVariant("stem", "_stem_kernel", fn, dtype, f"D{d} W{width} T{block_t}",
                                 signature(fn, pointers, consts, {"eps": "fp32"}), consts, warps, 1)  # fmt: skip
