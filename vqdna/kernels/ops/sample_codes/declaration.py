"""sample_codes: Gumbel-max code sampling (reference.sample_codes: the torch RNG's draws, or with a seed
reference.sample_codes_philox: counter-based draws). Declaration: see vqdna/kernels/ops/registry.py.
Inference only (codes carry no gradient)."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration

# The backends whose noise is Philox keyed by the `seed` argument (reference.sample_codes_philox): the
# wrapper draws a seed for them. The others draw torch's uniform_ stream (the peer's numbers) and take
# none; the reference op computes either, by whether it is given a seed.
PHILOX_BACKENDS = ("triton",)


def sample_codes_reference(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool = False, block_rows: int = 4096,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if seed is None:
        return reference.sample_codes(z, codebook, temp, cosine, block_rows)
    return reference.sample_codes_philox(z, codebook, temp, cosine, seed)


def sample_codes_fake(z, codebook, temp, cosine=False, block_rows=4096, seed=None):
    """z [N, D] -> codes int64 [N], quantized [N, D] float32, dist [N] float32; with per-head codebooks
    [C, K, D], z [N, C, D] -> codes, dist [N, C], quantized [N, C, D]."""
    lead = z.shape[:-1]
    return z.new_empty(lead, dtype=torch.int64), z.new_empty(z.shape, dtype=torch.float32), z.new_empty(lead, dtype=torch.float32)


DECLARATION = OpDeclaration(
    name="sample_codes",
    reference=sample_codes_reference,
    fake=sample_codes_fake,
    compiled=("native",),
    triton="vqdna.kernels.ops.sample_codes.triton_kernel",
)
