"""ema_stats (docs/design.md §2.3): per-code counts and vector sums, the reduction of the EMA codebook update
(`ema_update` in wrapper.py applies the EMA to them). Declaration: see vqdna/kernels/ops/registry.py."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.registry import OpDeclaration


def ema_stats_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    mask: Optional[torch.Tensor],
    prev_codes: Optional[torch.Tensor],
    prev_codebook: Optional[torch.Tensor],
    num_codes: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.ema_stats(x, codes, num_codes, mask=mask, prev_codes=prev_codes, prev_codebook=prev_codebook)


def ema_stats_fake(x, codes, mask, prev_codes, prev_codebook, num_codes, deterministic):
    """x [N, D] -> counts [K], sums [K, D], float32 (float64 for float64 x: the reference only)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(num_codes, dtype=acc), x.new_empty(num_codes, x.shape[1], dtype=acc)


DECLARATION = OpDeclaration(
    name="ema_stats",
    reference=ema_stats_reference,
    fake=ema_stats_fake,
    triton="vqdna.kernels.ops.ema_stats.triton_kernel",
    # The bench times the public ema_update (these statistics plus the EMA a user pays for).
    bench=("ema_update", "vqdna.kernels.ops.ema_stats.bench:cases"),
)
