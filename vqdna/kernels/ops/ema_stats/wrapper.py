"""vqdna.kernels.ema_stats (the op) and ema_update (the EMA codebook update built on it): validation
and one dispatch per call (docs/design.md §2.3)."""

from __future__ import annotations

from typing import Optional

import torch

from vqdna.kernels import reference
from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import backend_op

__all__ = ["ema_stats", "ema_update"]


def ema_stats(
    x: torch.Tensor,
    codes: torch.Tensor,
    num_codes: int,
    *,
    mask: Optional[torch.Tensor] = None,
    prev_codes: Optional[torch.Tensor] = None,
    prev_codebook: Optional[torch.Tensor] = None,
    deterministic: Optional[bool] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts [K] and vector sums [K, D] (float32) of the rows of x [..., D] by codes [...].

    mask [...] bool: False rows count for nothing. prev_codes [...] and prev_codebook [K', D]: the
    vector of a row is 2 x - prev_codebook[prev_code] (HRQ's H_l, recomputed, never stored).
    deterministic: no float atomics, bitwise repeatable; default torch.are_deterministic_algorithms_enabled().
    """
    d = x.shape[-1]
    flat_x = x.detach().reshape(-1, d).contiguous()
    flat_codes = codes.detach().reshape(-1).to(torch.int32).contiguous()
    if flat_codes.shape[0] != flat_x.shape[0]:
        raise ValueError(f"ema_stats: x has {flat_x.shape[0]} rows but codes has {flat_codes.shape[0]}")
    if num_codes < 1:
        raise ValueError(f"ema_stats: num_codes must be >= 1, got {num_codes}")
    flat_mask = None if mask is None else mask.detach().reshape(-1).to(torch.bool).contiguous()
    if flat_mask is not None and flat_mask.shape[0] != flat_x.shape[0]:
        raise ValueError(f"ema_stats: mask has {flat_mask.shape[0]} rows, x has {flat_x.shape[0]}")
    if (prev_codes is None) != (prev_codebook is None):
        raise ValueError("ema_stats: pass prev_codes and prev_codebook together")
    if prev_codes is not None:
        prev_codes = prev_codes.detach().reshape(-1).to(torch.int32).contiguous()
        prev_codebook = prev_codebook.detach().to(x.dtype).contiguous()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    name = select_backend("ema_stats", backend, x.device, x.dtype, size=(flat_x.shape[0], int(num_codes)))
    return backend_op("ema_stats", name)(flat_x, flat_codes, flat_mask, prev_codes, prev_codebook, int(num_codes), bool(deterministic))


def ema_update(
    x: torch.Tensor,
    codes: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    *,
    decay: float = 0.99,
    eps: float = reference.EMA_EPS,
    mask: Optional[torch.Tensor] = None,
    prev_codes: Optional[torch.Tensor] = None,
    prev_codebook: Optional[torch.Tensor] = None,
    process_group=None,
    sync: bool = False,
    deterministic: Optional[bool] = None,
    backend: str = "auto",
) -> None:
    """EMA codebook update in place (docs/design.md §2.3).

    x [..., D] the quantised vectors (or Z_l with prev_codes/prev_codebook: see `ema_stats`),
    codes [...] their codes; state: cluster_size [K] float32, embed_sum [K, D] float32, and the
    codebook [K, D] (any float dtype) rewritten as embed_sum / Laplace-smoothed cluster_size.
    Per-head codebooks, all in one call: cluster_size [C, K], embed_sum and codebook [C, K, D], x
    [..., C, D], codes [..., C] (head c's code in codebook c), mask [...] or [..., C]; each codebook
    is smoothed on its own (as C calls of the single-codebook update would).
    sync: all_reduce (SUM) the fused [counts | sums] buffer over process_group first, so every rank
    applies the same update.
    """
    k = cluster_size.shape[-1]
    if cluster_size.dim() == 2:  # C codebooks: codebook c's codes are c * K + code in one reduction
        c = cluster_size.shape[0]
        if codes.shape[-1:] != (c,) or x.shape[-2:-1] != (c,) or embed_sum.shape[:2] != (c, k):
            raise ValueError(f"ema_update: cluster_size {tuple(cluster_size.shape)} holds {c} codebooks: need x [..., {c}, D], "
                             f"codes [..., {c}], embed_sum [{c}, {k}, D]; got x {tuple(x.shape)}, codes {tuple(codes.shape)}, "
                             f"embed_sum {tuple(embed_sum.shape)}")
        codes = codes + torch.arange(c, device=codes.device, dtype=codes.dtype) * k
        if mask is not None and mask.shape != codes.shape:
            mask = mask[..., None].expand(codes.shape)
    counts, sums = ema_stats(
        x, codes, cluster_size.numel(), mask=mask, prev_codes=prev_codes, prev_codebook=prev_codebook,
        deterministic=deterministic, backend=backend,
    )
    if sync:
        import torch.distributed as dist

        buf = torch.cat([counts, sums.reshape(-1)])
        dist.all_reduce(buf, group=process_group)
        counts, sums = buf[: counts.numel()], buf[counts.numel() :]
    cluster_size.mul_(decay).add_(counts.view(cluster_size.shape).to(cluster_size.dtype), alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums.view(embed_sum.shape).to(embed_sum.dtype), alpha=1.0 - decay)
    codebook.copy_(embed_sum / reference.laplace_smoothed(cluster_size, eps)[..., None])
