"""stem (docs/design.md §2.5): GELU(LayerNorm(Conv1d(one_hot(ids)))) fused as a gather-sum. Declaration: see
vqdna/kernels/ops/registry.py."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def stem_reference(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return reference.stem(ids, weight, bias, ln_weight, ln_bias, ln_eps=ln_eps).to(out_dtype)


def stem_fake(ids, weight, bias, ln_weight, ln_bias, ln_eps, out_dtype):
    """ids [B, L], weight [D, 5, W] -> [B, L, D] in out_dtype."""
    return weight.new_empty(ids.shape[0], ids.shape[1], weight.shape[0], dtype=out_dtype)


def _stem_recompute(ids, weight, bias, ln_weight, ln_bias, ln_eps):
    """The stem in differentiable torch ops (the backward recomputes through it): F.embedding per
    tap, whose backward is a scatter-add, so no one-hot tensor here either. No data-dependent checks,
    so AOTAutograd can trace it; ids were validated by the forward (an invalid id made that forward
    raise or write NaN; here it is read as pad)."""
    d, _, width = weight.shape
    half = width // 2
    batch, length = ids.shape
    ids = ids.long()
    ids = torch.where((ids >= 0) & (ids <= reference.BASE_PAD_ID), ids, reference.BASE_PAD_ID)
    padded = torch.nn.functional.pad(ids, (half, half), value=reference.BASE_PAD_ID)
    table = torch.cat([weight, weight.new_zeros(d, 1, width)], dim=1)  # channel 5 (pad) adds 0
    y = bias.expand(batch, length, d)
    for j in range(width):
        y = y + torch.nn.functional.embedding(padded[:, j : j + length], table[:, :, j].T)
    y = torch.nn.functional.layer_norm(y, (d,), ln_weight, ln_bias, ln_eps)
    return torch.nn.functional.gelu(y)


def _stem_setup_context(ctx, inputs, output):
    ids, weight, bias, ln_weight, ln_bias, ln_eps, _ = inputs
    ctx.save_for_backward(ids, weight, bias, ln_weight, ln_bias)
    ctx.ln_eps = ln_eps


def _stem_backward(ctx, grad):
    """Gradients of weight, bias, ln_weight, ln_bias by recomputing the forward in torch ops (the
    fast forward is what matters; training pays one extra stem pass)."""
    ids, *params = ctx.saved_tensors
    needs = ctx.needs_input_grad[1:5]
    grads = [None] * 4
    if grad is not None and any(needs):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs)]
            out = _stem_recompute(ids, *leaves, ctx.ln_eps)
            wanted = [i for i, n in enumerate(needs) if n]
            for i, g in zip(wanted, torch.autograd.grad(out, [leaves[i] for i in wanted], grad.to(out.dtype))):
                grads[i] = g
    return (None, *grads, None, None)


DECLARATION = OpDeclaration(
    name="stem",
    reference=stem_reference,
    fake=stem_fake,
    triton="vqdna.kernels.ops.stem.triton_kernel",
    autograd=(_stem_backward, _stem_setup_context),
    bench=("stem", "vqdna.kernels.ops.stem.bench:cases"),
)
