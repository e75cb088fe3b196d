"""vqdna.kernels.kmeans: k-means from the fast kernels (docs/design.md §2.4)."""

from __future__ import annotations

import torch

from vqdna.kernels import reference
from vqdna.kernels.ops.ema_stats.wrapper import ema_stats
from vqdna.kernels.ops.lookup.wrapper import lookup

__all__ = ["kmeans"]


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    *,
    init: str = "kmeans++",
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """k-means on x [N, D] with the fast kernels: `lookup` assigns, `ema_stats` (decay 0) updates.
    init "kmeans++" (D^2 sampling, on the device, no host sync per step) or "random".
    A cluster left empty keeps its previous centroid. Deterministic for a seed (and backend).
    Returns centroids [k, D] in float32 (float64 for float64 x).
    """
    x = x.detach().reshape(-1, x.shape[-1])
    centroids = reference.kmeans_init(x, k, init=init, seed=seed)
    acc = centroids.dtype
    for _ in range(iters):
        codes, _ = lookup(x, centroids.to(x.dtype), backend=backend)
        counts, sums = ema_stats(x, codes, k, backend=backend)
        means = sums.to(acc) / counts.to(acc).clamp_min(1)[:, None]
        centroids = torch.where((counts > 0)[:, None], means, centroids)
    return centroids
