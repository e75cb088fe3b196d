"""quantize (docs/design.md §2.1): lookup fused with the gather of the chosen rows, the commitment-loss sum
and the non-finite row report. Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def quantize_reference(
    z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference.quantize(z, codebook, codebook_sqnorm, normalize)


def quantize_fake(z, codebook, codebook_sqnorm, normalize=False):
    """z [N, D] -> codes int32 [N], quantized [N, D] (dtype of z), dist [N] and sqdist_sum [] float32
    (float64 for float64 z: the reference only), nonfinite int64 [2]; the same with normalize."""
    n = z.shape[0]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (
        z.new_empty(n, dtype=torch.int32),
        z.new_empty(z.shape),
        z.new_empty(n, dtype=acc),
        z.new_empty((), dtype=acc),
        z.new_empty(2, dtype=torch.int64),
    )


def _quantize_setup_context(ctx, inputs, output):
    codes, quantized, _, _, nonfinite = output
    ctx.save_for_backward(inputs[0], quantized)
    ctx.mark_non_differentiable(codes, nonfinite)
    ctx.normalize = len(inputs) > 3 and bool(inputs[3])


def _quantize_backward(ctx, grad_codes, grad_quantized, grad_dist, grad_sum, grad_nonfinite):
    """dL/dz = g_quantized (straight-through) + 2 (g_sum + g_dist) (z - quantized) (the commitment
    term: dist and sqdist_sum are ||z - sg(quantized)||^2 per row and summed). Float32 arithmetic.
    normalize: that is dL/du of u = l2norm(z) (recomputed here), taken through l2norm's Jacobian."""
    z, quantized = ctx.saved_tensors
    x = reference.l2norm(z) if ctx.normalize else z
    grad = None if grad_quantized is None else grad_quantized.float()
    if grad_sum is not None or grad_dist is not None:
        scale = torch.zeros((), device=z.device) if grad_sum is None else grad_sum.float()
        if grad_dist is not None:
            scale = scale + grad_dist.float()[:, None]
        commit = (x.float() - quantized.float()) * (2.0 * scale)
        grad = commit if grad is None else grad + commit
    if grad is not None and ctx.normalize:
        grad = reference.l2norm_backward(z, grad)
    return (None if grad is None else grad.to(z.dtype)), None, None, None


DECLARATION = OpDeclaration(
    name="quantize",
    reference=quantize_reference,
    fake=quantize_fake,
    compiled=("native", "cuda"),
    triton="vqdna.kernels.ops.quantize.triton_kernel",
    autograd=(_quantize_backward, _quantize_setup_context),
    bench=("quantize", "vqdna.kernels.ops.quantize.bench:cases"),
)
