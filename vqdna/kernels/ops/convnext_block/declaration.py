"""convnext_block (docs/design.md §3): one ConvNeXt block of the tokenizer, channels-last, inference
only. Backends: the reference and the native CPU kernel (csrc/ops/convnext_block/cpu.cpp, float32);
no Triton or CUDA kernel yet. Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def convnext_block_reference(
    x: torch.Tensor,
    keep: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: torch.Tensor,
    tile_rows: int = 0,
) -> torch.Tensor:
    # tile_rows (the native kernel's positions per task) does not change the result: the spec ignores it.
    return reference.convnext_block(x, keep, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, ln_eps=ln_eps)


def convnext_block_fake(x, keep, dw_weight, dw_bias, ln_weight, ln_bias, ln_eps, w1, b1, w2, b2, gamma, tile_rows=0):
    """x [B, L, D] -> [B, L, D] in x's dtype (contiguous)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


DECLARATION = OpDeclaration(
    name="convnext_block",
    reference=convnext_block_reference,
    fake=convnext_block_fake,
    compiled=("native",),  # no CUDA kernel (nor Triton): "auto" runs the reference on a GPU
    autograd=None,  # inference only: the model runs its block's torch ops when autograd records
    bench=("convnext_block", "vqdna.kernels.ops.convnext_block.bench:cases"),
)
