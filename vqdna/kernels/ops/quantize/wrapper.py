"""vqdna.kernels.quantize: validation, chunking and one dispatch per call (docs/design.md §2.1)."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.lookup.wrapper import _MAX_ROWS_PER_LAUNCH, check_lookup_inputs, codebook_operands
from vqdna.kernels.ops.registry import backend_op

__all__ = ["quantize"]


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    codebook_sqnorm: Optional[torch.Tensor] = None,
    backend: str = "auto",
    codes_dtype: torch.dtype = torch.int32,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lookup` fused with what a VQ layer does next, in one pass over z (docs/design.md §2.1).

    z [..., D] and codebook [K, D]: same dtype (float32, bfloat16, float16; float64 on the reference
    backend only) and device. codebook_sqnorm [K] (optional, float32): ||e_k||^2.
    Returns codes [...] (int32, or codes_dtype int64) and dist [...] float32 as `lookup`;
    quantized [..., D] (dtype of z) = codebook[codes], with the straight-through gradient to z;
    sqdist_sum [] float32 = sum of dist (float64 accumulation; the commitment loss is
    sqdist_sum / z.numel()), whose gradient to z is 2 (z - quantized); nonfinite int64 [2] =
    (count of non-finite rows, the first one's flat row index or -1), left on the device (no host
    sync). The codebook gets no gradient.
    normalize: search, output and loss of the unit rows u = l2norm(z) instead of z (cosine similarity
    with a unit codebook; the native kernel normalises each row in cache, no pass over z), dist and
    sqdist_sum of u; the gradient to z goes through l2norm's Jacobian (reference.quantize).
    backend: "auto" | "cuda" | "triton" | "native" | "reference" (env VQDNA_BACKEND replaces "auto").
    """
    check_lookup_inputs(z, codebook, codebook_sqnorm, op="quantize", codes_dtype=codes_dtype)
    lead, d = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, d).contiguous()  # not detached: the op's autograd formula gives z its gradient
    n = flat.shape[0]
    name = select_backend("quantize", backend, z.device, z.dtype, size=(n, codebook.shape[0]))
    cb, sq = codebook_operands(codebook, codebook_sqnorm)
    op = backend_op("quantize", name)
    if n <= _MAX_ROWS_PER_LAUNCH:
        codes, quantized, dist, sqdist_sum, nonfinite = op(flat, cb, sq, bool(normalize))
    else:
        parts = [op(flat[s : s + _MAX_ROWS_PER_LAUNCH], cb, sq, bool(normalize)) for s in range(0, n, _MAX_ROWS_PER_LAUNCH)]
        codes, quantized, dist = (torch.cat([p[i] for p in parts]) for i in range(3))
        sqdist_sum = torch.stack([p[3].double() for p in parts]).sum().to(parts[0][3].dtype)
        counts = torch.stack([p[4][0] for p in parts])
        firsts = torch.stack([
            torch.where(p[4][1] >= 0, p[4][1] + s, n) for p, s in zip(parts, range(0, n, _MAX_ROWS_PER_LAUNCH))
        ]).min()
        nonfinite = torch.stack([counts.sum(), torch.where(firsts < n, firsts, -1)])
    return codes.to(codes_dtype).reshape(lead), quantized.reshape(z.shape), dist.reshape(lead), sqdist_sum, nonfinite
