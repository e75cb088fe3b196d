"""vqdna.kernels.hrq_quantize: validation and one dispatch per call (docs/design.md §2.2)."""

from __future__ import annotations

import torch

from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.lookup.wrapper import check_lookup_inputs
from vqdna.kernels.ops.registry import backend_op

__all__ = ["hrq_quantize"]


def hrq_quantize(
    zs,
    codebooks,
    *,
    codebook_sqnorms=None,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    losses: bool = False,
    codes_only: bool = False,
):
    """Hierarchical residual quantization with residual doubling, all levels fused (docs/design.md §2.2).

    zs: L tensors [..., D] (or one tensor [L, ..., D]), one dtype (float32/bfloat16/float16) and device.
    codebooks: L tensors [K_l, D] of that dtype. codebook_sqnorms: optional L tensors [K_l] float32.
    Returns codes int32 [L, ...] (level-local code indices) and zhat_levels [L, ..., D] (dtype of zs),
    zhat_levels[l] the cumulative mean of the chosen code embeddings of levels 0..l (the decoder input
    is zhat_levels[-1]). Differentiable w.r.t. zs with the straight-through gradient of docs/design.md §2.2
    (d zhat_levels[-1] / d Z_0 = 1/L, / d Z_l = 2/L); codebooks get no gradient.

    out: optional (codes, zhat_levels) to write into and return, contiguous, of the shapes and dtypes
    above (no autograd). The native backend writes them in place: reused across calls, they spare the
    cost of a fresh output (page faults and the OS zero-filling every new page, about as much as the
    writes themselves for outputs above glibc's 32 MB mmap threshold). Other backends compute as usual
    and copy the result in.

    losses=True: also return, from the same pass, sqdist [L, ...] float32 = ||Z_l - zhat_levels[l]||^2
    per row, sqdist_sum [L] float32 (float64 accumulation; HRQ's commitment loss is
    sum_l sqdist_sum[l] / zs[l].numel()) and nonfinite int64 [L, 2] = per level (count of non-finite
    rows, the first one's flat row index or -1), left on the device (no host sync); sqdist and
    sqdist_sum differentiate to 2 (Z_l - zhat_levels[l]) (zhat detached). Returns the 5-tuple
    (codes, zhat_levels, sqdist, sqdist_sum, nonfinite).
    codes_only=True: returns codes alone; no zhat_levels is allocated or written (tokenization).
    Not differentiable (runs without autograd).
    """
    if isinstance(zs, torch.Tensor):
        zs = list(zs.unbind(0))
    zs, codebooks = list(zs), list(codebooks)
    if len(zs) == 0 or len(zs) != len(codebooks):
        raise ValueError(f"hrq_quantize: need L >= 1 inputs and as many codebooks, got {len(zs)} and {len(codebooks)}")
    lead, d = zs[0].shape[:-1], zs[0].shape[-1]
    for level, (z, cb) in enumerate(zip(zs, codebooks)):
        if z.shape != zs[0].shape:
            raise ValueError(f"hrq_quantize: zs[{level}] has shape {tuple(z.shape)}, zs[0] has {tuple(zs[0].shape)}")
        check_lookup_inputs(z, cb, None if codebook_sqnorms is None else codebook_sqnorms[level], op=f"hrq_quantize (level {level})")
        if z.dtype != zs[0].dtype or z.device != zs[0].device:
            raise TypeError(f"hrq_quantize: zs[{level}] is {z.dtype} on {z.device}, zs[0] is {zs[0].dtype} on {zs[0].device}")
    name = select_backend(
        "hrq_quantize", backend, zs[0].device, zs[0].dtype, size=(zs[0].numel() // max(d, 1), sum(cb.shape[0] for cb in codebooks))
    )
    flat = [z.reshape(-1, d).contiguous() for z in zs]
    sizes = [int(cb.shape[0]) for cb in codebooks]
    packed = torch.cat([cb.detach() for cb in codebooks]).contiguous()
    acc = torch.float64 if packed.dtype == torch.float64 else torch.float32
    if codebook_sqnorms is None:
        sq = packed.to(acc).pow(2).sum(-1)
    else:
        sq = torch.cat([s.detach().to(acc) for s in codebook_sqnorms]).contiguous()
    if codes_only:
        if out is not None or losses:
            raise ValueError("hrq_quantize: codes_only=True takes neither out= nor losses=True")
        with torch.no_grad():
            return backend_op("hrq_quantize", name)(flat, packed, sq, sizes, True)[0].reshape(len(zs), *lead)
    if out is not None:
        if losses:
            raise ValueError("hrq_quantize: out= does not return losses (call it with losses=False)")
        return _hrq_quantize_out(name, zs, flat, packed, sq, sizes, out)
    codes, levels, sqdist, sqdist_sum, nonfinite = backend_op("hrq_quantize", name)(flat, packed, sq, sizes)
    codes, levels = codes.reshape(len(zs), *lead), levels.reshape(len(zs), *lead, d)
    if not losses:
        return codes, levels
    return codes, levels, sqdist.reshape(len(zs), *lead), sqdist_sum, nonfinite


def _hrq_quantize_out(name, zs, flat, packed, sq, sizes, out):
    """hrq_quantize into caller-owned (codes, zhat_levels); see hrq_quantize."""
    codes_out, levels_out = out
    shape = (len(zs), *zs[0].shape[:-1])
    for label, t, want_shape, want_dtype in (("codes", codes_out, shape, torch.int32),
                                             ("zhat_levels", levels_out, (*shape, zs[0].shape[-1]), zs[0].dtype)):
        if tuple(t.shape) != want_shape or t.dtype != want_dtype or t.device != zs[0].device or not t.is_contiguous():
            raise ValueError(f"hrq_quantize: out {label} must be a contiguous {want_dtype} tensor of shape "
                             f"{want_shape} on {zs[0].device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             + ("" if t.is_contiguous() else " (not contiguous)"))
    if torch.is_grad_enabled() and any(z.requires_grad for z in zs):
        raise RuntimeError("hrq_quantize(out=...) does not support autograd: call it under torch.no_grad() "
                           "or without out=")
    n, d = flat[0].shape
    if name == "native":
        torch.ops.vqdna.hrq_quantize_native_out(flat, packed, sq, sizes, codes_out.view(len(zs), n),
                                                levels_out.view(len(zs), n, d))
    else:
        codes, levels = backend_op("hrq_quantize", name)(flat, packed, sq, sizes)[:2]
        codes_out.view(len(zs), n).copy_(codes)
        levels_out.view(len(zs), n, d).copy_(levels)
    return codes_out, levels_out
