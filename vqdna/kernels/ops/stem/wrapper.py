"""vqdna.kernels.stem: validation and one dispatch per call (docs/design.md §2.5)."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels import cuda_launch, reference
from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import FLOAT_DTYPES, backend_op

__all__ = ["stem", "select_stem_backend"]

ID_DTYPES = (torch.uint8, torch.int32, torch.int64)  # what the backends read; other ints widen to int64


def select_stem_backend(backend: str, device: torch.device, d: int, width: int, out_dtype: torch.dtype,
                         dtype: torch.dtype) -> str:
    """select_backend for a stem with weight [d, 5, width]: the CUDA kernel stages the weight table in
    shared memory and keeps a position's D features in registers, so it cannot run every shape;
    "auto" then takes the next backend and backend="cuda" raises with the reason."""

    def why_not(b: str) -> Optional[str]:
        if b != "cuda":
            return None
        return cuda_launch.stem_cuda_unsupported(d, width, out_dtype, cuda_launch.device_smem_optin(device))

    return select_backend("stem", backend, device, dtype, why_not=why_not)


def stem(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    ln_eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """The tokenizer stem fused (docs/design.md §2.5): GELU(LayerNorm(Conv1d(one_hot(ids)))) as a gather-sum,
    never building the one-hot tensor or (on the fast backends) the pre-activation.

    ids [B, L] integer (uint8 preferred): 0..4 = A C G T N, 5 = pad (adds nothing, like Conv1d's zero
    padding), any layout. weight [D, 5, W] (the Conv1d weight, W odd, padding W // 2), bias,
    ln_weight, ln_bias [D]: float32 / bfloat16 / float16 (float64 on the reference backend only), one
    device. Accumulates in float32; returns [B, L, D] in out_dtype (default float32, float64 for
    float64 weights; bfloat16 / float16 on request).
    Differentiable w.r.t. weight, bias, ln_weight, ln_bias (backward recomputes in torch ops).
    An id outside 0..5 raises ValueError naming ids[b, t]; check_ids=False skips the wrapper's check
    on the Triton / CUDA backends (one host sync), which then write NaN around such an id (the native
    kernel and the reference always check). backend: "auto" | "cuda" | "triton" | "native" | "reference".
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"stem: ids must be a [B, L] tensor, got {tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"stem: ids must be an integer tensor, got {ids.dtype}")
    if weight.dim() != 3 or weight.shape[1] != reference.NUM_BASES or weight.shape[2] % 2 == 0 or weight.shape[0] == 0:
        raise ValueError(f"stem: weight must be [D >= 1, 5, odd width], got {tuple(weight.shape)}")
    d = weight.shape[0]
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (d,):
            raise ValueError(f"stem: {name} must be [D] = [{d}] (D from weight), got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"stem: {name} has dtype {t.dtype}; expected float32, bfloat16, float16 (or float64)")
        if t.device != ids.device:
            raise ValueError(f"stem: device mismatch: {name} is on {t.device}, ids on {ids.device}")
    wide = torch.float64 in (weight.dtype, bias.dtype, ln_weight.dtype, ln_bias.dtype)
    if out_dtype is None:
        out_dtype = torch.float64 if wide else torch.float32
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"stem: out_dtype must be float32, bfloat16 or float16 (or float64), got {out_dtype}")
    name = select_stem_backend(backend, ids.device, d, weight.shape[2], out_dtype,
                                torch.float64 if wide or out_dtype == torch.float64 else out_dtype)
    if ids.dtype not in ID_DTYPES:
        ids = ids.to(torch.int64)
    ids = ids.contiguous()
    params = (weight, bias, ln_weight, ln_bias)
    if name != "reference":
        params = tuple(p.float().contiguous() for p in params)  # differentiable casts: gradients flow back
        if name != "native" and check_ids and not torch.compiler.is_compiling():
            reference.check_base_ids(ids)
    return backend_op("stem", name)(ids, *params, float(ln_eps), out_dtype)
