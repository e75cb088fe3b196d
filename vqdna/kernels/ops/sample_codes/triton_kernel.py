"""Triton sample_codes: Gumbel-max sampling in lookup's one-pass search (the spec is
reference.sample_codes_philox). Per [BLOCK_N, BLOCK_K] tile: the dot products (lookup's `code_dots`),
the logits, Gumbel noise from Triton's counter-based Philox stream (`tl.rand(seed, row * K + code)`:
the draws do not depend on the tiling or the launch; per-head codebooks [C, K, D]: a program axis over
the heads, the counter of (c, row, code) (c N + row) K + code) and a running argmin per row; then the chosen
rows are copied to `quantized` and their squared distances summed (`copy_code_rows`). Neither the
N x K logits nor the noise reach global memory, and the seed is read on the device (no host sync).

Not the peer's draws (those are torch's uniform_ stream, which a kernel cannot reproduce per element
cheaply): the same distribution, other numbers. Registered as `vqdna::sample_codes_triton`.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vqdna.kernels.ops.lookup.triton_kernel import AOT_HEADS, code_dots, copy_code_rows, row_sqnorms, row_tile
from vqdna.kernels.triton.common import (
    AotVariant,
    Tile,
    autotune_configs,
    device_guard,
    fold_argmin,
    jit_function,
    pipelined_shared_bytes,
    prune_for_device,
    signature,
    size_class,
)

__all__ = ["sample_codes_triton"]

# float32 only (the op's inputs). At most 16 tile elements per thread: the Philox rounds hold six
# 32-bit words per element on top of the exact-fp32 dot products (`vqdna gpu-check`: 64 x 64 with 8
# warps takes 255 registers on sm_80 without spilling; 64 x 32 with 4 warps spilled 112-128 B there).
TILES = [
    Tile(64, 64, 32, 8, 2, ("fp32",)),
    Tile(32, 64, 32, 8, 2, ("fp32",)),
    Tile(32, 32, 32, 4, 2, ("fp32",)),
]
# The interpreter runs on the CPU: one small tile (several K tiles at small K, so the tests fold
# across tiles).
INTERPRETER_TILE = Tile(16, 32, 32, 1, 1, ("fp32",))


def shared_bytes(tile: Tile, dtype_bytes: int) -> int:
    """Shared memory a tile needs (the pruning rule; gpu-check compares it with the compiled value)."""
    return pipelined_shared_bytes(tile, dtype_bytes)


@triton.jit
def sample_head_tile(
    z_ptr, e_ptr, e_sqnorm_ptr, seed_ptr, codes_ptr, q_ptr, dist_ptr, N, K, D, temp, C: tl.constexpr,
    COSINE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The kernel's body for per-head codebooks (C > 1): program axis 1 is the head c; its rows z[:, c]
    of z [N, C, D] (row stride C D), its codebook e[c] of e [C, K, D] (first row c K: offsets, not
    offset pointers, which would stay live in registers), outputs at row i C + c of codes, dist [N, C]
    and quantized [N C, D], and the Philox counters (c N + i) K + k: [C, N, K] row-major. The
    single-codebook body with these offsets; not shared with C = 1, whose build changed when it was
    (gpu-check sm_90, through a helper or with head-0 offsets inline: 4 to 18 more registers)."""
    head = tl.program_id(1)
    rows, row_ok, z_tile, z_offs = row_tile(z_ptr, N, C * D, BLOCK_N)
    z_tile += head * D
    counter_base = (tl.cast(head, tl.int64) * N + rows) * K
    e0 = head * K
    out = rows.to(tl.int64) * C + head
    if not COSINE:
        z_sqnorm = row_sqnorms(z_tile, z_offs, row_ok, D, EVEN_D, BLOCK_N, BLOCK_D)
    seed = tl.load(seed_ptr)
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        dot = code_dots(z_tile, z_offs, e_ptr, e0 + k0, row_ok, code_ok, D, True, False, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D)
        u = tl.rand(seed, counter_base[:, None] + codes[None, :])
        noise = tl.log(tl.maximum(-tl.log(tl.maximum(u, 1e-20)), 1e-20))  # minus a Gumbel sample
        if COSINE:
            scores = noise - dot / temp
        else:
            e_sqnorm = tl.load(e_sqnorm_ptr + (codes + e0), mask=code_ok, other=0.0)
            d = z_sqnorm[:, None] + (e_sqnorm[None, :] - 2.0 * dot)
            # NaN must stay NaN (it never wins): the default maximum would return the other operand
            scores = tl.sqrt(tl.maximum(d, 1e-8, propagate_nan=tl.PropagateNan.ALL)) / temp + noise
        best, best_code = fold_argmin(best, best_code, scores, code_ok, k0)
    tl.store(codes_ptr + out, best_code.to(tl.int64), mask=row_ok)
    dist = copy_code_rows(z_ptr, e_ptr, q_ptr, out, row_ok, best_code + e0, D, EVEN_D, True, BLOCK_N, BLOCK_D)
    tl.store(dist_ptr + out, dist, mask=row_ok)


@triton.autotune(
    configs=autotune_configs(TILES, INTERPRETER_TILE),
    key=["N_CLASS", "K", "D", "C", "COSINE"],
    prune_configs_by={"early_config_prune": prune_for_device("z_ptr", shared_bytes, TILES)},
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _sample_codes_kernel(
    z_ptr,
    e_ptr,
    e_sqnorm_ptr,
    seed_ptr,  # int64 [1]: the Philox key
    codes_ptr,
    q_ptr,
    dist_ptr,
    N,
    K,
    D,
    temp,
    N_CLASS,  # size_class(N): only an autotuning key
    C: tl.constexpr,  # codebooks (heads): z [N, C, D], e [C, K, D], outputs [N, C, ...]; 1: z [N, D], e [K, D]
    COSINE: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if C == 1:  # one codebook (a constant): this body exactly as before, so it compiles as before
        rows, row_ok, z_tile, z_offs = row_tile(z_ptr, N, D, BLOCK_N)
        if not COSINE:
            z_sqnorm = row_sqnorms(z_tile, z_offs, row_ok, D, EVEN_D, BLOCK_N, BLOCK_D)
        seed = tl.load(seed_ptr)
        counter_base = rows.to(tl.int64) * K  # 64-bit counters: N K can exceed 2^31
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_code = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < K
            dot = code_dots(z_tile, z_offs, e_ptr, k0, row_ok, code_ok, D, True, False, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D)
            u = tl.rand(seed, counter_base[:, None] + codes[None, :])
            noise = tl.log(tl.maximum(-tl.log(tl.maximum(u, 1e-20)), 1e-20))  # minus a Gumbel sample
            if COSINE:
                scores = noise - dot / temp
            else:
                e_sqnorm = tl.load(e_sqnorm_ptr + codes, mask=code_ok, other=0.0)
                d = z_sqnorm[:, None] + (e_sqnorm[None, :] - 2.0 * dot)
                # NaN must stay NaN (it never wins): the default maximum would return the other operand
                scores = tl.sqrt(tl.maximum(d, 1e-8, propagate_nan=tl.PropagateNan.ALL)) / temp + noise
            best, best_code = fold_argmin(best, best_code, scores, code_ok, k0)
        tl.store(codes_ptr + rows, best_code.to(tl.int64), mask=row_ok)
        dist = copy_code_rows(z_ptr, e_ptr, q_ptr, rows, row_ok, best_code, D, EVEN_D, True, BLOCK_N, BLOCK_D)
        tl.store(dist_ptr + rows, dist, mask=row_ok)
    else:
        sample_head_tile(z_ptr, e_ptr, e_sqnorm_ptr, seed_ptr, codes_ptr, q_ptr, dist_ptr, N, K, D, temp, C,
                         COSINE, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D)


@triton_op("vqdna::sample_codes_triton", mutates_args=())
def sample_codes_triton(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool = False, block_rows: int = 4096,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [N, D], codebook [K, D] float32 (same device), temp > 0, seed int64 [1] (required: the Philox
    key; on z's device). Returns codes int64 [N], quantized [N, D] float32, dist [N] float32
    (reference.sample_codes_philox). block_rows is the torch-stream backends' and unused here.
    Per-head codebooks: z [N, C, D], codebook [C, K, D] -> codes, dist [N, C], quantized [N, C, D], in
    one launch (grid axis 1 over the C heads; Philox counters (c N + i) K + k)."""
    if seed is None:
        raise ValueError("sample_codes_triton: draws Philox noise from a seed (int64 [1]); got none")
    n, d = z.shape[0], z.shape[-1]
    k = codebook.shape[-2]
    c = codebook.shape[0] if codebook.dim() == 3 else 1
    z, codebook = z.contiguous(), codebook.contiguous()
    e_sqnorm = codebook.pow(2).sum(-1)
    codes = torch.empty(z.shape[:-1], dtype=torch.int64, device=z.device)
    quantized = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    dist = torch.empty(z.shape[:-1], dtype=torch.float32, device=z.device)
    if n == 0:
        return codes, quantized, dist

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), c)

    with device_guard(z.device):
        wrap_triton(_sample_codes_kernel)[grid](
            z, codebook, e_sqnorm, seed, codes, quantized, dist, n, k, d, float(temp), size_class(n), C=c,
            COSINE=bool(cosine),
        )
    return codes, quantized, dist


def aot_variants():
    """What `vqdna gpu-check` compiles: every tile, distance and cosine, with and without the
    dimension mask, for one codebook and per-head codebooks (lookup's AOT_HEADS)."""
    fn = jit_function(_sample_codes_kernel)
    pointers = {"z_ptr": "*fp32", "e_ptr": "*fp32", "e_sqnorm_ptr": "*fp32", "seed_ptr": "*i64",
                "codes_ptr": "*i64", "q_ptr": "*fp32", "dist_ptr": "*fp32"}  # fmt: skip
    for tile, c, cosine, even_d in itertools.product(TILES, AOT_HEADS, (False, True), (True, False)):
        consts = {"C": c, "COSINE": cosine, "EVEN_D": even_d,
                  "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "BLOCK_D": tile.block_d}  # fmt: skip
        sig = signature(fn, pointers, consts, {"temp": "fp32"})
        label = tile.label + (" cosine" if cosine else "") + ("" if even_d else " masked-D") + (f" C={c}" if c > 1 else "")
        yield AotVariant("sample_codes", fn.__name__, fn, "fp32", label, sig, consts,
                         tile.num_warps, tile.num_stages, shared_bytes(tile, 4), tile.archs)  # fmt: skip
