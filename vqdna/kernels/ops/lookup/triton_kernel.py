"""Triton nearest-code lookup (docs/design.md §2.1): one fused kernel, distance tiles from tl.dot and a running
(min, argmin) per row across K tiles; the N x K distance matrix never reaches global memory.

Registered as the custom op `vqdna::lookup_triton` (torch.library.triton_op), so torch.compile sees it.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.dispatch import triton_interpreter
from vqdna.kernels.triton.common import (
    TORCH_DTYPES,
    AotVariant,
    HALF,
    Tile,
    autotune_configs,
    chunk_masks,
    device_guard,
    jit_function,
    pipelined_shared_bytes,
    prune_for_device,
    running_argmin,
    signature,
    size_class,
)

__all__ = ["lookup_triton"]


# The tiles the autotuner may pick on a GPU (common.Tile: BLOCK_N, BLOCK_K, BLOCK_D, warps, stages,
# dtypes, only without the dimension mask, architectures). `vqdna gpu-check` compiles each for what it
# is declared for, under Triton 3.6 (the GPU machines') and 3.9, and fails on a 16-bit spill: with the
# dimension mask every 16-bit tile over 32 x 32 spilled somewhere, 4-warp tiles over 64 x 64 spilled
# everywhere, 64/128 x 128/64 x 64 spill on sm_80 and 128 x 128 x 64 on sm_90 under Triton 3.6
# (48-116 B), so none of those is declared there. Exact float32 (FMA) keeps two small tiles.
TILES = [
    Tile(128, 128, 32, 8, 3, HALF, even_d_only=True),
    Tile(64, 128, 64, 8, 3, HALF, even_d_only=True, archs=(90,)),
    Tile(128, 64, 64, 8, 3, HALF, even_d_only=True, archs=(90,)),
    Tile(64, 64, 32, 8, 2, ("fp32",)),
    Tile(32, 32, 32, 4, 2),
]
INTERPRETER_TILE = Tile(32, 128, 64, 1, 1)  # the interpreter runs on the CPU: one small tile
# The same tiles for per-head codebooks (C > 1: a head's row offset and codebook row live in registers
# too): the 16-bit 128 x 128 x 32 tile spilled 16 B on sm_80 under Triton 3.9 (255 registers without
# them), so there it is declared for sm_90 only.
HEAD_TILES = [dataclasses.replace(t, archs=(90,)) if t.block_n == t.block_k == 128 else t for t in TILES]


def shared_bytes(tile: Tile, dtype_bytes: int) -> int:
    """Shared memory a tile needs (the pruning rule; gpu-check compares it with the compiled value)."""
    return pipelined_shared_bytes(tile, dtype_bytes)


@triton.jit
def row_tile(z_ptr, N, D, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N-row tile of a contiguous z [N, D]: rows int32 [BLOCK_N], row_ok (which
    exist), the tile's base pointer and its row offsets [BLOCK_N, 1]. 64-bit tile base (N * D can
    exceed 2^31), 32-bit offsets inside a tile: half the registers of a 64-bit pointer per element."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, z_ptr + pid.to(tl.int64) * BLOCK_N * D, tl.arange(0, BLOCK_N)[:, None] * D


@triton.jit
def row_sqnorms(z_tile, z_offs, row_ok, D, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """||z||^2 float32 [BLOCK_N] of a row tile (row_tile)."""
    z_sqnorm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        z_ok = row_ok[:, None] if EVEN_D else row_ok[:, None] & (dims < D)[None, :]
        zt = tl.load(z_tile + z_offs + dims[None, :], mask=z_ok, other=0.0).to(tl.float32)
        z_sqnorm += tl.sum(zt * zt, axis=1)
    return z_sqnorm


@triton.jit
def code_dots(
    z_tile, z_offs, e_ptr, k0, row_ok, code_ok, D,
    IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z.e_k float32 [BLOCK_N, BLOCK_K] of a row tile (row_tile) with the codes k0 .. k0 + BLOCK_K of
    e [K, D] (code_ok: which exist), from tl.dot over BLOCK_D chunks (exact float32 with IEEE_FP32)."""
    e_tile = e_ptr + tl.cast(k0, tl.int64) * D
    e_offs = tl.arange(0, BLOCK_K)[:, None] * D
    dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        z_ok, e_ok = chunk_masks(row_ok, code_ok, dims, D, EVEN_D)
        zt = tl.load(z_tile + z_offs + dims[None, :], mask=z_ok, other=0.0)
        et = tl.load(e_tile + e_offs + dims[None, :], mask=e_ok, other=0.0)
        if UPCAST:
            zt = zt.to(tl.float32)
            et = et.to(tl.float32)
        if IEEE_FP32 or UPCAST:
            dot = tl.dot(zt, tl.trans(et), dot, input_precision="ieee")
        else:
            dot = tl.dot(zt, tl.trans(et), dot)
    return dot


@triton.jit
def nearest_codes(
    z_ptr, e_ptr, e_sqnorm_ptr, N, K, D, ZS, Z0, E0,
    IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The search of this program's BLOCK_N-row tile of z [N, D] against the codebook e [K, D] with
    e_sqnorm [K] float32. Returns rows int32 [BLOCK_N] (the tile's row indices), row_ok (which exist),
    code int32 and dist float32 [BLOCK_N] = (argmin_k, min_k) of ||z - e_k||^2, ties to the smallest
    k, dist clamped at 0 and non-finite for a non-finite row. Shared by the lookup and quantize kernels.
    One head of per-head codebooks: z's rows start at element Z0 with row stride ZS (head c of z
    [N, C, D]: Z0 = c * D, ZS = C * D; else 0 and D), the codebook at row E0 of e and e_sqnorm (c * K;
    else 0). Offsets, not offset pointers: a computed pointer would stay live in registers."""
    rows, row_ok, z_tile, z_offs = row_tile(z_ptr, N, ZS, BLOCK_N)
    z_tile += Z0
    z_sqnorm = row_sqnorms(z_tile, z_offs, row_ok, D, EVEN_D, BLOCK_N, BLOCK_D)
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        dot = code_dots(z_tile, z_offs, e_ptr, E0 + k0, row_ok, code_ok, D, IEEE_FP32, UPCAST, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D)
        e_sqnorm = tl.load(e_sqnorm_ptr + E0 + codes, mask=code_ok, other=0.0)
        best, best_code = running_argmin(best, best_code, dot, e_sqnorm, code_ok, k0)

    dist = best + z_sqnorm
    dist = tl.where(dist < 0.0, 0.0, dist)  # clamp, but keep NaN (a non-finite row must show)
    return rows, row_ok, best_code, dist


@triton.jit
def copy_code_rows(
    z_ptr, e_ptr, q_ptr, rows, row_ok, code, D,
    EVEN_D: tl.constexpr, SQDIST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """quantized rows q[rows] = e[code] of a row tile, copied in the input dtype (bit-exact); with
    SQDIST also returns ||z - q||^2 float32 [BLOCK_N] (summed over D in float32; else zeros). For
    after a search loop, when its operand tiles are dead. 64-bit row bases (code * D and N * D can
    exceed 2^31), in chunks of 32 dims: a [BLOCK_N, 64] chunk of 64-bit pointers spilled the 128 x 64
    x 64 16-bit quantize tile on sm_90 (24 B). BLOCK_D is a multiple of 32, so EVEN_D holds here too."""
    COPY_D: tl.constexpr = 32
    tl.static_assert(BLOCK_D % COPY_D == 0)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * D
    e_rows = e_ptr + code.to(tl.int64)[:, None] * D
    sqdist = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, COPY_D):
        dims = d0 + tl.arange(0, COPY_D)
        ok = row_ok[:, None] if EVEN_D else row_ok[:, None] & (dims < D)[None, :]
        q = tl.load(e_rows + dims[None, :], mask=ok)
        tl.store(q_rows + dims[None, :], q, mask=ok)
        if SQDIST:
            zt = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=ok, other=0.0)
            diff = tl.where(ok, zt.to(tl.float32) - q.to(tl.float32), 0.0)
            sqdist += tl.sum(diff * diff, axis=1)
    return sqdist


_prune_one, _prune_heads = (prune_for_device("z_ptr", shared_bytes, tiles) for tiles in (TILES, HEAD_TILES))


def _prune(configs, named_args, **kwargs):
    """The autotuner's pruning: TILES for one codebook, HEAD_TILES for per-head codebooks."""
    return (_prune_heads if kwargs.get("C", named_args.get("C", 1)) > 1 else _prune_one)(configs, named_args, **kwargs)


@triton.autotune(
    configs=autotune_configs(TILES, INTERPRETER_TILE),
    key=["N_CLASS", "K", "D", "C", "IEEE_FP32", "UPCAST"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
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
    N_CLASS,  # size_class(N): only an autotuning key
    C: tl.constexpr,  # codebooks (heads): z [N, C, D], e [C, K, D], e_sqnorm [C, K], codes/dist [N, C]; 1: [K, D]
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no dimension mask (the masked loads cost registers)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if C == 1:  # one codebook (a constant: the single-codebook kernel is compiled as it always was)
        rows, row_ok, best_code, dist = nearest_codes(
            z_ptr, e_ptr, e_sqnorm_ptr, N, K, D, D, 0, 0, IEEE_FP32, UPCAST, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D
        )
        tl.store(codes_ptr + rows, best_code, mask=row_ok)
        tl.store(dist_ptr + rows, dist, mask=row_ok)
    else:
        # Program axis 1 is the head: its rows z[:, head] (row stride C * D), its codebook and sqnorms.
        head = tl.program_id(1)
        rows, row_ok, best_code, dist = nearest_codes(
            z_ptr, e_ptr, e_sqnorm_ptr, N, K, D, C * D, head * D, head * K,
            IEEE_FP32, UPCAST, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D,
        )
        out = rows.to(tl.int64) * C + head
        tl.store(codes_ptr + out, best_code, mask=row_ok)
        tl.store(dist_ptr + out, dist, mask=row_ok)


@triton_op("vqdna::lookup_triton", mutates_args=())
def lookup_triton(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D] contiguous, codebook [K, D] contiguous (same dtype: float32/bfloat16/float16),
    codebook_sqnorm [K] float32. Returns codes int32 [N], dist float32 [N] (docs/design.md §2.1).
    Per-head codebooks: z [N, C, D], codebook [C, K, D], codebook_sqnorm [C, K] (contiguous) ->
    codes, dist [N, C], in one launch (grid axis 1 over the C heads)."""
    n, d = z.shape[0], z.shape[-1]
    k = codebook.shape[-2]
    c = codebook.shape[0] if codebook.dim() == 3 else 1
    lead = z.shape[:-1]
    codes = torch.empty(lead, dtype=torch.int32, device=z.device)
    dist = torch.empty(lead, dtype=torch.float32, device=z.device)
    if n == 0:
        return codes, dist

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), c)

    with device_guard(z.device):
        wrap_triton(_lookup_kernel)[grid](
            z, codebook, codebook_sqnorm, codes, dist, n, k, d, size_class(n), C=c, **search_constants(z)
        )
    return codes, dist


def search_constants(z: torch.Tensor) -> dict:
    """The dtype constants of a kernel built on `nearest_codes`, for inputs of z's dtype."""
    return {
        "IEEE_FP32": z.dtype == torch.float32,
        # The Triton interpreter's tl.dot reads bfloat16 as raw bits; products of bf16 values are
        # exact in float32, so upcasting there computes what the tensor cores compute on a GPU.
        "UPCAST": z.dtype == torch.bfloat16 and triton_interpreter(),
    }


# The head counts gpu-check compiles the lookup kernel for: one codebook, and per-head codebooks (the
# head count is a constant of the kernel, compiled per count; 4 stands for every C > 1).
AOT_HEADS = (1, 4)


def aot_variants():
    """What `vqdna gpu-check` compiles of lookup (search_aot_variants, for each of AOT_HEADS: TILES for
    one codebook, HEAD_TILES for more)."""
    for c in AOT_HEADS:
        yield from search_aot_variants("lookup", _lookup_kernel, HEAD_TILES if c > 1 else TILES,
                                       {"codes_ptr": "*i32", "dist_ptr": "*fp32"}, [{"C": c}])


def search_aot_variants(op: str, kernel, tiles, out_pointers: dict, extra_consts=({},)):
    """The gpu-check variants of a kernel built on `nearest_codes` (lookup, quantize): every declared
    tile for each dtype it is declared for, with and without the dimension mask where the tile allows
    both (on a GPU the other constants follow from the dtype), and the shared-memory estimate the
    pruner applies per arch. out_pointers: the Triton types of the kernel's other pointer arguments
    ("*dtype" stands for the input dtype). extra_consts: the kernel's further constants, one variant
    set per dict (named in the label unless it is the only one)."""
    fn = jit_function(kernel)
    for dtype, torch_dtype in TORCH_DTYPES.items():
        for tile in tiles:
            if dtype not in tile.dtypes:
                continue
            for even_d in (True, False) if not tile.even_d_only else (True,):
                for extra in extra_consts:
                    consts = {"IEEE_FP32": torch_dtype == torch.float32, "UPCAST": False, "EVEN_D": even_d,
                              "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "BLOCK_D": tile.block_d, **extra}  # fmt: skip
                    ptr = f"*{dtype}"
                    pointers = {"z_ptr": ptr, "e_ptr": ptr, "e_sqnorm_ptr": "*fp32"}
                    pointers.update({name: ptr if t == "*dtype" else t for name, t in out_pointers.items()})
                    sig = signature(fn, pointers, consts)
                    label = tile.label + ("" if even_d else " masked-D") + "".join(f" {k}={v}" for k, v in extra.items())
                    yield AotVariant(op, fn.__name__, fn, dtype, label, sig, consts,
                                     tile.num_warps, tile.num_stages, shared_bytes(tile, torch_dtype.itemsize), tile.archs)  # fmt: skip
