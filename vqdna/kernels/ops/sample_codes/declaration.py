"""sample_codes: Gumbel-max code sampling with the torch RNG's draws (reference.sample_codes).
Declaration: see vqdna/kernels/ops/registry.py. Inference only (codes carry no gradient)."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def sample_codes_reference(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool = False, block_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.sample_codes(z, codebook, temp, cosine, block_rows)


def sample_codes_fake(z, codebook, temp, cosine=False, block_rows=4096):
    """z [N, D] -> codes int64 [N], quantized [N, D] float32, dist [N] float32."""
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(z.shape, dtype=torch.float32), z.new_empty(n, dtype=torch.float32)


DECLARATION = OpDeclaration(
    name="sample_codes",
    reference=sample_codes_reference,
    fake=sample_codes_fake,
    compiled=("native",),
)
