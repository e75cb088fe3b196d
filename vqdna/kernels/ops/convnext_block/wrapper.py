"""vqdna.kernels.convnext_block: validation and one dispatch per call (docs/design.md §3)."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import FLOAT_DTYPES, backend_op

__all__ = ["convnext_block"]


def convnext_block(
    x: torch.Tensor,
    keep: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: torch.Tensor,
    *,
    ln_eps: float = 1e-6,
    tile_rows: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """One ConvNeXt block, channels-last, for inference: keep * (x + gamma * Linear2(GELU(Linear1(
    LayerNorm(DWConv(x)))))) (spec: vqdna.kernels.reference.convnext_block).

    x [B, L, D] float; keep [B, L] bool or None; dw_weight [D, 1, k] (k odd), dw_bias, ln_weight,
    ln_bias, b2, gamma [D]; w1 [H, D], b1 [H], w2 [D, H]; one device. Returns [B, L, D] in x's dtype.
    The native CPU kernel (one pass per tile of tile_rows positions, 0: 512, around two GEMMs) runs
    float32 CPU tensors; "auto" takes the reference for anything else (logged at DEBUG).
    Not differentiable: raises when autograd would record (call under torch.no_grad(), or use the
    module). backend: "auto" | "native" | "reference".
    """
    params = {"dw_weight": dw_weight, "dw_bias": dw_bias, "ln_weight": ln_weight, "ln_bias": ln_bias,
              "w1": w1, "b1": b1, "w2": w2, "b2": b2, "gamma": gamma}
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"convnext_block: x must be a [B, L, D] tensor, got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    batch, length, d = x.shape
    if dw_weight.dim() != 3 or dw_weight.shape[:2] != (d, 1) or dw_weight.shape[2] % 2 == 0:
        raise ValueError(f"convnext_block: dw_weight must be [D, 1, odd k] with D = {d} (from x), got {tuple(dw_weight.shape)}")
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"convnext_block: w1 must be [H, D] with D = {d}, got {tuple(w1.shape)}")
    h = w1.shape[0]
    shapes = {"dw_bias": (d,), "ln_weight": (d,), "ln_bias": (d,), "b1": (h,), "w2": (d, h), "b2": (d,), "gamma": (d,)}
    for name, shape in shapes.items():
        if params[name].shape != shape:
            raise ValueError(f"convnext_block: {name} must be {list(shape)} (D, H from x, w1), got {tuple(params[name].shape)}")
    if keep is not None and (keep.shape != (batch, length) or keep.dtype != torch.bool):
        raise ValueError(f"convnext_block: keep must be a bool [B, L] = [{batch}, {length}] tensor or None, got {keep.dtype} {tuple(keep.shape)}")
    for name, t in {"x": x, **params}.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"convnext_block: {name} has dtype {t.dtype}; expected float32, bfloat16, float16 or float64")
        if t.device != x.device:
            raise ValueError(f"convnext_block: device mismatch: {name} is on {t.device}, x on {x.device}")
    if keep is not None and keep.device != x.device:
        raise ValueError(f"convnext_block: device mismatch: keep is on {keep.device}, x on {x.device}")
    if tile_rows < 0:
        raise ValueError(f"convnext_block: tile_rows must be >= 0 (0: automatic), got {tile_rows}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params.values())):
        raise RuntimeError("convnext_block is inference only (no autograd): call it under torch.no_grad(), "
                           "or run vqdna.kernels.reference.convnext_block (differentiable)")
    dtypes = {t.dtype for t in (x, *params.values())}
    dtype = x.dtype if len(dtypes) == 1 else torch.float64 if torch.float64 in dtypes else torch.float32

    def why_not(b: str) -> Optional[str]:  # the native kernel computes float32 only
        if b == "native" and dtypes != {torch.float32}:
            return f"the native kernel takes float32 tensors only, got {', '.join(sorted(str(t)[6:] for t in dtypes))}"
        return None

    name = select_backend("convnext_block", backend, x.device, dtype, size=(batch * length, d), why_not=why_not)
    return backend_op("convnext_block", name)(x, keep, dw_weight, dw_bias, ln_weight, ln_bias, float(ln_eps),
                                              w1, b1, w2, b2, gamma, int(tile_rows))
