"""hrq_quantize (docs/design.md §2.2): hierarchical residual quantization with residual doubling, all levels
fused. Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def hrq_quantize_reference(
    zs: list[torch.Tensor], codebooks: torch.Tensor, codebook_sqnorms: torch.Tensor, codebook_sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference.hrq_quantize(list(zs), list(codebooks.split(codebook_sizes)))


def hrq_quantize_fake(zs, codebooks, codebook_sqnorms, codebook_sizes):
    """L tensors [N, D] -> codes int32 [L, N], zhat_levels [L, N, D] (dtype of zs)."""
    n, d = zs[0].shape
    return zs[0].new_empty(len(zs), n, dtype=torch.int32), zs[0].new_empty(len(zs), n, d)


def hrq_quantize_out_fake(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, zhat_levels):
    return None


def _hrq_setup_context(ctx, inputs, output):
    ctx.zs_dtype = inputs[0][0].dtype
    ctx.mark_non_differentiable(output[0])  # codes


def _hrq_backward(ctx, grad_codes, grad_levels):
    """Straight-through gradient of docs/design.md §2.2: zhat_levels[l] = mean_{m<=l} Hhat_m with
    dHhat_m/dZ_0 = 1 (m = 0) and dHhat_m/dZ_m = 2 (m >= 1), so
    dL/dZ_m = c_m * sum_{l>=m} grad_levels[l] / (l + 1), c_0 = 1, c_m = 2."""
    if grad_levels is None:
        return None, None, None, None
    n_levels = grad_levels.shape[0]
    scale = 1.0 / torch.arange(1, n_levels + 1, device=grad_levels.device, dtype=torch.float32)
    per_level = grad_levels.float() * scale.view(-1, *([1] * (grad_levels.dim() - 1)))
    suffix = per_level.flip(0).cumsum(0).flip(0)
    factor = torch.full((n_levels,), 2.0, device=grad_levels.device)
    factor[0] = 1.0
    grad_zs = (suffix * factor.view(-1, *([1] * (grad_levels.dim() - 1)))).to(ctx.zs_dtype)
    return list(grad_zs.unbind(0)), None, None, None


DECLARATION = OpDeclaration(
    name="hrq_quantize",
    reference=hrq_quantize_reference,
    fake=hrq_quantize_fake,
    triton="vqdna.kernels.ops.hrq_quantize.triton_kernel",
    autograd=(_hrq_backward, _hrq_setup_context),
    # The native kernel into caller-owned outputs (hrq_quantize(out=...)).
    compiled_extras={"hrq_quantize_native_out": ("native", hrq_quantize_out_fake)},
    bench=("hrq_quantize", "vqdna.kernels.ops.hrq_quantize.bench:cases"),
)
