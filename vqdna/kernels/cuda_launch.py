"""What the CUDA launchers (csrc/ops/<op>/cuda.cu) decide on the host, in Python: pure functions of the
sizes, dtype, pointer alignment and the device's shared-memory limits, callable without a GPU.

dispatch uses them to keep backend="auto" off a CUDA kernel that cannot run a shape, and tests use
them to check which kernel path a call takes. They mirror the C++ (csrc/ops/<op>/cuda.cuh of
stem, ema_stats and lookup); tests/build/test_cuda_compile.py compiles the C++ side on the host and checks that
both give the same answers, so a change to one that is not made to the other fails CI.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from vqdna.kernels.compile_marks import assume_constant_result

# Opt-in shared memory per block and shared memory per SM (bytes), for tests and for planning
# without a GPU; at run time the device's own values are read (smem_limits).
SMEM_OPTIN = {"sm_80": 166_912, "sm_90": 232_448}
SMEM_PER_SM = {"sm_80": 167_936, "sm_90": 233_472}

# ---------------------------------------------------------------------------------------------
# stem (csrc/ops/stem/cuda.cuh)

STEM_MAX_DIM = 2048  # kStemMaxDim: a warp keeps a position's D features in registers, 64 per lane
STEM_MAX_WIDTH = 1024  # kStemMaxWidth
_STEM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def stem_table_bytes(d: int, width: int) -> int:
    """Dynamic shared memory (bytes) of the CUDA stem: its [W, 5, D] float32 weight table."""
    return 5 * width * d * 4


def stem_cuda_unsupported(d: int, width: int, out_dtype: torch.dtype, smem_optin: int) -> Optional[str]:
    """None when the CUDA stem can run weight [D, 5, W] with this output dtype on a device with
    `smem_optin` bytes of opt-in shared memory per block; else the reason it cannot (the limits
    csrc/ops/stem/cuda_binding.cpp enforces)."""
    if out_dtype not in _STEM_OUT_DTYPES:
        return f"the CUDA stem writes float32, bfloat16 or float16, not {out_dtype}"
    if not 1 <= d <= STEM_MAX_DIM:
        return f"the CUDA stem takes D in [1, {STEM_MAX_DIM}], got D = {d}"
    if width < 1 or width % 2 == 0 or width > STEM_MAX_WIDTH:
        return f"the CUDA stem takes an odd kernel width W in [1, {STEM_MAX_WIDTH}], got W = {width}"
    need = stem_table_bytes(d, width)
    if need > smem_optin:
        return (f"the CUDA stem's [W, 5, D] = [{width}, 5, {d}] float32 weight table needs {need} bytes of "
                f"shared memory, over this GPU's {smem_optin} bytes per block")
    return None


_smem_limits: dict = {}


@assume_constant_result  # torch.compile evaluates it once while tracing
def smem_limits(device_index: int) -> tuple[int, int]:
    """(opt-in shared memory per block, shared memory per SM) in bytes of CUDA device `device_index`
    (torch.cuda.get_device_properties; cached)."""
    if device_index not in _smem_limits:
        props = torch.cuda.get_device_properties(device_index)
        per_block = getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block
        per_sm = getattr(props, "shared_memory_per_multiprocessor", None) or per_block
        _smem_limits[device_index] = (int(per_block), int(per_sm))
    return _smem_limits[device_index]


def device_smem_optin(device: torch.device) -> int:
    """Opt-in shared memory per block (bytes) of a CUDA device (the current one when it has no index)."""
    device = torch.device(device)
    return smem_limits(device.index if device.index is not None else torch.cuda.current_device())[0]


# ---------------------------------------------------------------------------------------------
# ema_stats fast mode (csrc/ops/ema_stats/cuda.cuh: ema_atomic_plan)

_EMA_LOG_V = {torch.float32: 2, torch.bfloat16: 3, torch.float16: 3}  # log2 of the lanes' 16-byte vector
_EMA_MAX_GROUP_LOG2 = 5  # a row group has at most 32 lanes


class EmaAtomicPlan(NamedTuple):
    """How launch_ema_stats_atomic runs a call."""

    smem_table: bool  # per-block shared-memory table; else global atomics (16-byte vector atomics on sm_90 with vec)
    group_log2: int  # lanes per row group, log2
    table_bytes: int  # dynamic shared memory of the launch (0 without the table)
    col_tiles: int  # grid.y: column tiles of 2^(group_log2 + log2 V) columns
    vec: bool  # 16-byte vector loads (and, without the table, float4 atomics on sm_90)


def _ceil_log2(v: int) -> int:
    return max(int(v) - 1, 0).bit_length()


def _padded_cols(d: int, dtile_log2: int) -> int:
    t = 1 << dtile_log2
    return -(-d // t) * t - d


def ema_group_log2(d: int, log_v: int) -> int:
    """Lane-group width (log2) covering d with the fewest padded columns, at most 32 lanes."""
    if d <= 0:
        return 0
    g = min(_ceil_log2((d + (1 << log_v) - 1) >> log_v), _EMA_MAX_GROUP_LOG2)
    if g > 0 and _padded_cols(d, g - 1 + log_v) < _padded_cols(d, g + log_v):
        g -= 1
    return g


def ema_atomic_plan(d: int, num_codes: int, dtype: torch.dtype, smem_per_sm: int, smem_optin: int,
                    inputs_aligned16: bool = True, sums_aligned16: bool = True) -> EmaAtomicPlan:
    """The path of the CUDA EMA fast mode for x [N, D] of `dtype` and `num_codes` codes on a device
    with these shared-memory limits (bytes). inputs_aligned16: x (and prev_codebook, if any) start
    on a 16-byte boundary; sums_aligned16: the output sums do (torch's fresh tensors always do)."""
    log_v = _EMA_LOG_V[dtype]
    g_need = ema_group_log2(d, log_v)
    g_min = min(g_need, 2)  # >= 4 lanes: >= 64-byte row segments

    def table_bytes(g: int) -> int:
        return num_codes * ((1 << (g + log_v)) + 1) * 4

    # A table that leaves room for two blocks per SM; else one block per SM; else global atomics.
    two_per_sm = smem_per_sm // 2 - 2048 if smem_per_sm // 2 > 2048 else 0
    smem, g = False, g_need
    for budget in (min(two_per_sm, smem_optin), smem_optin):
        gg = g_need
        while gg > g_min and table_bytes(gg) > budget:
            gg -= 1
        if table_bytes(gg) <= budget:
            smem, g = True, gg
            break
    tile = 1 << (g + log_v)
    tiles = -(-d // tile) if d > 0 else 1
    vec = d > 0 and d % (1 << log_v) == 0 and inputs_aligned16 and (smem or sums_aligned16)
    return EmaAtomicPlan(smem, g, table_bytes(g) if smem else 0, tiles, vec)


# ---------------------------------------------------------------------------------------------
# lookup / hrq_quantize (csrc/common/cuda_search_plan.h: mma_vec_loads)


def mma_vec_loads(dtype: torch.dtype, d: int, inputs_aligned16: bool) -> bool:
    """Whether the CUDA lookup / HRQ tensor-core search (bf16 / fp16) stages its tiles with 16-byte
    cp.async / vector loads: D % 8 == 0 and every input row block (z or each Z_l, the codebook)
    16-byte aligned; otherwise bounds-checked 2-byte loads. float32 always uses 4-byte cp.async."""
    return dtype in (torch.bfloat16, torch.float16) and d > 0 and d % 8 == 0 and inputs_aligned16
