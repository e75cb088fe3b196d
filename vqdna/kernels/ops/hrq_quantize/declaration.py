"""hrq_quantize (docs/design.md §2.2): hierarchical residual quantization with residual doubling, all levels
fused. Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def hrq_quantize_reference(
    zs: list[torch.Tensor],
    codebooks: torch.Tensor,
    codebook_sqnorms: torch.Tensor,
    codebook_sizes: list[int],
    codes_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        codes, levels = reference.hrq_quantize(list(zs), list(codebooks.split(codebook_sizes)))
        if codes_only:
            return (codes, *_codes_only_rest(zs))
        return (codes, levels, *reference.hrq_level_losses(list(zs), levels))


def _codes_only_rest(zs):
    """The four outputs a codes-only call leaves empty ([0] each, of the usual dtypes)."""
    acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
    z = zs[0]
    return z.new_empty(0), z.new_empty(0, dtype=acc), z.new_empty(0, dtype=acc), z.new_empty(0, dtype=torch.int64)


def hrq_quantize_fake(zs, codebooks, codebook_sqnorms, codebook_sizes, codes_only=False):
    """L tensors [N, D] -> codes int32 [L, N], zhat_levels [L, N, D] (dtype of zs), sqdist [L, N] and
    sqdist_sum [L] float32 (float64 for float64 zs: the reference only), nonfinite int64 [L, 2];
    with codes_only every output but codes is empty ([0])."""
    n, d = zs[0].shape
    n_levels = len(zs)
    codes = zs[0].new_empty(n_levels, n, dtype=torch.int32)
    if codes_only:
        return (codes, *_codes_only_rest(zs))
    acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
    return (
        codes,
        zs[0].new_empty(n_levels, n, d),
        zs[0].new_empty(n_levels, n, dtype=acc),
        zs[0].new_empty(n_levels, dtype=acc),
        zs[0].new_empty(n_levels, 2, dtype=torch.int64),
    )


def hrq_quantize_out_fake(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, zhat_levels):
    return None


def _hrq_setup_context(ctx, inputs, output):
    codes, levels, _, _, nonfinite = output
    ctx.zs_dtype = inputs[0][0].dtype
    ctx.codes_only = inputs[4]
    ctx.save_for_backward(*inputs[0], levels)  # the commitment term's z - zhat
    ctx.mark_non_differentiable(codes, nonfinite)


def _hrq_backward(ctx, grad_codes, grad_levels, grad_sqdist, grad_sum, grad_nonfinite):
    """Straight-through gradient of docs/design.md §2.2: zhat_levels[l] = mean_{m<=l} Hhat_m with
    dHhat_m/dZ_0 = 1 (m = 0) and dHhat_m/dZ_m = 2 (m >= 1), so
    dL/dZ_m = c_m * sum_{l>=m} grad_levels[l] / (l + 1), c_0 = 1, c_m = 2;
    plus the commitment term of sqdist / sqdist_sum (zhat_levels detached there):
    dL/dZ_l += 2 (grad_sum[l] + grad_sqdist[l][:, None]) (Z_l - zhat_levels[l]).
    float32 arithmetic (float64 for float64 zs)."""
    *zs, levels = ctx.saved_tensors
    n_levels = len(zs)
    acc = torch.float64 if ctx.zs_dtype == torch.float64 else torch.float32
    grads = [None] * n_levels
    if grad_levels is not None:
        scale = 1.0 / torch.arange(1, n_levels + 1, device=grad_levels.device, dtype=acc)
        per_level = grad_levels.to(acc) * scale.view(-1, *([1] * (grad_levels.dim() - 1)))
        suffix = per_level.flip(0).cumsum(0).flip(0)
        factor = torch.full((n_levels,), 2.0, device=grad_levels.device, dtype=acc)
        factor[0] = 1.0
        grads = list((suffix * factor.view(-1, *([1] * (grad_levels.dim() - 1)))).unbind(0))
    if grad_sqdist is not None or grad_sum is not None:
        weight = torch.zeros(n_levels, 1, device=levels.device, dtype=acc) if grad_sum is None else grad_sum.to(acc)[:, None]
        if grad_sqdist is not None:
            weight = weight + grad_sqdist.to(acc)  # [L, N]
        for level, z in enumerate(zs):
            commit = (z.to(acc) - levels[level].to(acc)) * (2.0 * weight[level][:, None])
            grads[level] = commit if grads[level] is None else grads[level] + commit
    # codebooks, codebook_sqnorms, codebook_sizes, and codes_only unless it was left at its default
    # (the dispatcher drops such arguments, and the backward returns one gradient per argument passed).
    rest = (None,) * (4 if ctx.codes_only else 3)
    if ctx.codes_only or all(g is None for g in grads):
        return None, *rest
    return [g.to(ctx.zs_dtype) for g in grads], *rest


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
