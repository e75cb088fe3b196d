"""lookup (docs/design.md §2.1): the nearest code of every row. Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def lookup_reference(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 dist, or float64 when the inputs are float64 (only the spec computes in float64).
    return reference.lookup(z, codebook, codebook_sqnorm)


def lookup_fake(z, codebook, codebook_sqnorm):
    """z [N, D] -> codes int32 [N], dist [N] float32 (float64 for float64 z: the reference only);
    with batched codebooks [C, K, D], z [N, C, D] -> codes, dist [N, C]."""
    lead = z.shape[:-1]
    dist_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(lead, dtype=torch.int32), z.new_empty(lead, dtype=dist_dtype)


DECLARATION = OpDeclaration(
    name="lookup",
    reference=lookup_reference,
    fake=lookup_fake,
    triton="vqdna.kernels.ops.lookup.triton_kernel",
    bench=("lookup", "vqdna.kernels.ops.lookup.bench:cases"),
)
