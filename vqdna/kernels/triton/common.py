"""What the Triton launchers share: the autotune tile declarations, their pruning per GPU
architecture, the autotune size class of N, the device guard, and the ahead-of-time variants that
`vqdna gpu-check` compiles (docs/design.md, "Checking GPU code without a GPU").

A kernel file declares its tiles once (`Tile` rows); `autotune_configs` turns them into the
autotuner's configs and `prune_for_device` drops, before any compile, the ones whose shared memory
cannot fit the running GPU (the same rule gpu-check applies per architecture). No function here
touches a GPU at import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import triton
import triton.language as tl

from vqdna.kernels.dispatch import triton_interpreter

# Opt-in shared memory per block (bytes) by compute capability major*10+minor: CUDA C Programming
# Guide, "Technical Specifications per Compute Capability" (163 KB on A100, 227 KB on H100/H200,
# 99 KB on sm_86/sm_89 consumer parts). A device reports its own as shared_memory_per_block_optin.
SHARED_LIMIT_BYTES = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
HALF = ("bf16", "fp16")  # the 16-bit dtypes (tensor-core tiles)


@dataclass(frozen=True)
class Tile:
    """One autotune config: a [BLOCK_N, BLOCK_K] distance tile reduced over BLOCK_D dims per step.

    dtypes: the input dtypes it may run (a tile that spills for one dtype is declared without it);
    even_d_only: only when D % BLOCK_D == 0 (its dimension-masked variant spills);
    archs: the compute capabilities (major*10+minor, rounded down to a known one) it may run on
    (None: every one). `vqdna gpu-check` compiles each tile for what it is declared for."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    dtypes: tuple = ("fp32", "bf16", "fp16")
    even_d_only: bool = False
    archs: Optional[tuple] = None

    def config(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "BLOCK_D": self.block_d},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    @property
    def label(self) -> str:
        return f"{self.block_n}x{self.block_k}x{self.block_d} w{self.num_warps} s{self.num_stages}"


def tile_of(config: triton.Config) -> Tile:
    kw = config.kwargs
    return Tile(kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_D"], config.num_warps, config.num_stages)


def pipelined_shared_bytes(tile: Tile, dtype_bytes: int, operand_rows: Optional[int] = None) -> int:
    """Shared memory of a software-pipelined tl.dot loop: num_stages buffered copies of the operand
    tiles ([BLOCK_N + BLOCK_K, BLOCK_D] elements; operand_rows replaces BLOCK_N + BLOCK_K where a
    kernel stages more rows). An upper bound of what Triton allocates for these kernels (gpu-check
    compares it with the compiled value of every variant: (num_stages - 1) copies, the usual
    pipeline depth, was exceeded by float32 two-stage HRQ tiles)."""
    rows = operand_rows if operand_rows is not None else tile.block_n + tile.block_k
    return tile.num_stages * rows * tile.block_d * dtype_bytes


def arch_of(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def autotune_configs(tiles: Iterable[Tile], interpreter_tile: Tile) -> list[triton.Config]:
    """The autotuner's configs: every declared tile on a GPU; one small tile under the interpreter
    (which runs on the CPU, where tile choice only costs time)."""
    if triton_interpreter():
        return [interpreter_tile.config()]
    return [t.config() for t in tiles]


def declared_for(tile: Tile, arch: int) -> bool:
    """The tile is declared for this compute capability (sm_89 counts as sm_86, sm_100 as sm_90...:
    the nearest known one below)."""
    if tile.archs is None:
        return True
    known = [a for a in sorted(SHARED_LIMIT_BYTES) if a <= arch]
    return (known[-1] if known else arch) in tile.archs or arch in tile.archs


def allowed(tile: Tile, dtype: str, d: int, arch: int, shared_limit: int, shared_bytes: Callable[[Tile, int], int]) -> bool:
    """The launcher may run `tile` for this dtype, feature size, architecture and shared-memory
    limit (the rule the pruner applies on a GPU and gpu-check applies per architecture)."""
    return (
        dtype in tile.dtypes
        and declared_for(tile, arch)
        and (not tile.even_d_only or d % tile.block_d == 0)
        and shared_bytes(tile, DTYPE_BYTES[dtype]) <= shared_limit
    )


def prune_for_device(pointer_arg: str, shared_bytes: Callable[[Tile, int], int], tiles: Iterable[Tile]):
    """An autotuner `early_config_prune` hook: keep the declared tiles `allowed` for the call's
    dtype, D and GPU, so a config that can never launch (or would spill) is never compiled. The
    interpreter (CPU tensors) keeps its one tile."""
    declared = {(t.block_n, t.block_k, t.block_d, t.num_warps, t.num_stages): t for t in tiles}

    def prune(configs, named_args, **kwargs):
        t = named_args[pointer_arg]
        if not _is_cuda(t):
            return configs
        limit = torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin
        arch = arch_of(t.device)
        dtype, d = DTYPE_NAMES[t.dtype], int(named_args["D"])
        kept = [c for c in configs if allowed(declared.get(astuple_of(c), tile_of(c)), dtype, d, arch, limit, shared_bytes)]
        if not kept:
            raise RuntimeError(f"vqdna: no Triton config of this kernel fits sm_{arch} for {dtype}, D={d}")
        return kept

    return prune


def _is_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def astuple_of(config: triton.Config) -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_D"], config.num_warps, config.num_stages)


def jit_function(kernel):
    """The @triton.jit function under autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def size_class(n: int) -> int:
    """The autotune key of a row count: its power-of-two class (1 -> 1, 2..3 -> 2, 4..7 -> 3, ...).
    Tuning per class, not per exact N, retunes when the problem size changes by 2x, not per call."""
    return max(int(n), 1).bit_length()


@triton.jit
def chunk_masks(row_ok, code_ok, dims, D, EVEN_D: tl.constexpr):
    """Load masks of one BLOCK_D chunk for the Z rows and the codebook rows; the dimension mask only
    when D is not a multiple of BLOCK_D (its [rows, BLOCK_D] masks cost registers)."""
    if EVEN_D:
        return row_ok[:, None], code_ok[:, None]
    else:
        return row_ok[:, None] & (dims < D)[None, :], code_ok[:, None] & (dims < D)[None, :]


@triton.jit
def running_argmin(best, best_code, dot, e_sqnorm, code_ok, code_base):
    """Fold one [BLOCK_N, BLOCK_K] tile of dot products into the per-row (min score, code):
    score = ||e||^2 - 2 z.e (fold_argmin's rules)."""
    return fold_argmin(best, best_code, e_sqnorm[None, :] - 2.0 * dot, code_ok, code_base)


@triton.jit
def fold_argmin(best, best_code, scores, code_ok, code_base):
    """Fold one [BLOCK_N, BLOCK_K] tile of scores (codes code_base ...) into the per-row (min score,
    code int32). Padding codes and NaN scores never win; ties go to the smallest code, inside a tile
    (tie_break_left) and across tiles (strict <: a later tile's equal score loses)."""
    scores = tl.where(code_ok[None, :] & (scores == scores), scores, float("inf"))
    tile_best, tile_code = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best < best
    return tl.where(better, tile_best, best), tl.where(better, tile_code + code_base, best_code)


def int_tensor_on(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 [len(values)] on `device` without a host-to-device copy: one fill per value, each a
    kernel launch with the value as its argument (no sync, and capturable in a CUDA graph).
    torch.tensor(values, device="cuda") copies from pageable host memory: a sync."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int32)
    out = torch.empty(len(values), dtype=torch.int32, device=device)
    for i, v in enumerate(values):
        out[i : i + 1].fill_(int(v))
    return out


def device_guard(device: torch.device):
    """Launch on `device`, not on the current CUDA device (tensors on cuda:1 while cuda:0 is
    current). A no-op for CPU tensors (the interpreter) and while torch.compile traces (Inductor
    guards the launches it generates)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class AotVariant:
    """One compile that `vqdna gpu-check` runs: a @triton.jit function with its argument types and
    compile-time constants, as a launcher of this package can call it."""

    op: str
    kernel: str
    fn: object  # triton.runtime.jit.JITFunction
    dtype: str
    config: str
    signature: dict = field(hash=False)  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3
    # gpu-check also checks the shared-memory estimate the pruner uses for this variant (None: the
    # variant is not autotuned and has no estimate)
    shared_estimate: Optional[int] = None
    archs: Optional[tuple] = None  # declared for these architectures only (None: every one)


def signature(fn, pointers: dict, constexprs: dict, scalars: Optional[dict] = None) -> dict:
    """The compile signature of `fn`: named pointer types, "constexpr" for the constants, and the
    given (default "i32") types for the other scalar arguments."""
    scalars = scalars or {}
    fn = jit_function(fn)
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = scalars.get(name, "i32")
    return sig
