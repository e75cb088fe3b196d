"""Drop-in quantizer modules: `VectorQuantizer` (one EMA codebook) and `HRQuantizer` (hierarchical
residual quantization with residual doubling, DESIGN 2.2). Both only call `vqdna.kernels`; the
backend is chosen there, never here.

Argument names follow vector-quantize-pytorch's `VectorQuantize` where the meaning is the same
(`dim`, `codebook_size`, `decay`, `eps`, `commitment_weight`, `kmeans_init`, `kmeans_iters`,
`threshold_ema_dead_code`, `sync_codebook`). Differences: forward returns (quantized, codes, loss)
with codes int64 and the loss already weighted; the EMA state is always float32 buffers named
`codebook`, `cluster_size` and `embed_sum`; non-finite inputs raise a ValueError naming the row
(eager, CPU tensors) or fail a device-side assertion (CUDA tensors, torch.compile): see `check_finite`.

No host sync in a steady-state step (train or eval, any option): k-means init reads its flag from a
Python mirror of the `initted` buffer (re-read once when the buffer is loaded or replaced), dead-code
restarts pick their rows on the device, and the NaN/Inf check reads the device only where that is
free (eager CPU) unless asked to (check_finite="raise"). So both modules compile with
torch.compile(fullgraph=True) and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from vqdna import kernels

__all__ = ["VectorQuantizer", "HRQuantizer"]

_USAGE_DECAY = 0.9  # the recent-usage window of usage(): about the last 10 training batches


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value exactly; backward: the gradient passes to x unchanged.
    (x + (q - x).detach() computes the same in two extra passes over memory and rounds.)"""

    @staticmethod
    def forward(x, quantized):
        return quantized

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CommitmentLoss(torch.autograd.Function):
    """Weighted mean((x - sg(q))^2) over the unmasked rows, its value taken from the lookup's
    per-row squared distances (no extra pass over x). x, q [..., D]; row_sqdist [...] float32;
    row_weight [...] float32 or None (all ones). Backward: 2 w (x - q) / (D * sum(w))."""

    @staticmethod
    def forward(x, quantized, row_sqdist, row_weight):
        if row_weight is None:
            return row_sqdist.sum() / x.numel()
        return (row_sqdist * row_weight).sum() / (row_weight.sum().clamp_min(1) * x.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, quantized, _, row_weight = inputs
        ctx.save_for_backward(x, quantized, row_weight)

    @staticmethod
    def backward(ctx, grad):
        x, quantized, row_weight = ctx.saved_tensors
        diff = x.float() - quantized.float()
        if row_weight is None:
            gx = diff * (grad * 2.0 / x.numel())
        else:
            gx = diff * row_weight[..., None] * (grad * 2.0 / (row_weight.sum().clamp_min(1) * x.shape[-1]))
        return gx.to(x.dtype), None, None, None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank of the default group. The functional collective: torch.compile
    traces it (the in-place dist.broadcast breaks the graph)."""
    import torch.distributed._functional_collectives as funcol  # only where distributed is built

    return funcol.broadcast(t, 0, dist.group.WORLD)


_CHECK_FINITE = (True, False, "raise", "assert")

# Dead-code restarts pick batch rows from a hash of the batch's codes: no RNG state (the user's global
# torch RNG stream is left alone), on the device. MINSTD modulus and multiplier: every product and
# sum stays below 2^63.
_HASH_MODULUS = 2147483647
_HASH_MULTIPLIER = 48271
_HASHED_CODES = 4096


def _check_finite_mode(check_finite) -> Union[bool, str]:
    if check_finite not in _CHECK_FINITE or isinstance(check_finite, int) and not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be True, False, 'raise' or 'assert', got {check_finite!r}")
    return check_finite


def _check_finite(mode, row_dist: torch.Tensor, name: str) -> None:
    """The NaN/Inf check of one input; row_dist [...] is non-finite exactly at its bad rows (the
    lookup's distances: no extra pass over the input).

    mode True: a ValueError naming the first bad row in eager mode on CPU tensors (reading a CPU
    tensor drains no queue), else a device-side assertion (no host sync). "raise": that ValueError
    on every device (one host sync per call). "assert": always the device-side assertion. Under
    torch.compile both are the assertion: a graph cannot branch on a value."""
    if mode is False:
        return
    if not torch.compiler.is_compiling() and (mode == "raise" or (mode is True and row_dist.device.type == "cpu")):
        kernels.raise_on_nonfinite(row_dist, name)
    else:
        torch._assert_async(torch.isfinite(row_dist).all(), f"{name} holds NaN or Inf (check_finite='raise' names the row)")


class _EMACodebook(nn.Module):
    """One codebook with its float32 EMA state (DESIGN 2.3) and usage statistics."""

    def __init__(self, dim: int, codebook_size: int, decay: float, eps: float, threshold_ema_dead_code: float):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"need dim >= 1 and codebook_size >= 1, got dim={dim}, codebook_size={codebook_size}")
        self.decay, self.eps, self.threshold_ema_dead_code = decay, eps, threshold_ema_dead_code
        codebook = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("recent_counts", torch.zeros(codebook_size))
        self.register_buffer("initted", torch.tensor(False))
        # Python mirror of `initted` (forward reads this, not the buffer: no host sync per step), and
        # the (buffer, version) it was read from: eager forward re-reads once when either changed.
        self._initted_flag = False
        self._initted_seen: tuple = (None, -1)

    def _refresh_initted(self, force: bool = False) -> None:
        """Re-read the `initted` buffer into the Python flag (one host read) when it was replaced
        or written since the last read (or always, with force)."""
        buf = self.initted
        seen, version = self._initted_seen
        if buf.is_meta or not force and seen is buf and version == buf._version:
            return
        self._initted_flag = bool(buf)
        self._initted_seen = (buf, buf._version)

    def kmeans_pending(self) -> bool:
        """True until k-means has initialised this codebook (or a loaded state says it has)."""
        if not torch.compiler.is_compiling():  # compiled code guards on the flag instead
            self._refresh_initted()
        return not self._initted_flag

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_initted(force=True)

    def train(self, mode: bool = True):
        # train()/eval() run eagerly before a (compiled) loop: refresh the mirror there, so a state
        # loaded by other means than load_state_dict (e.g. transformers' from_pretrained) is seen.
        self._refresh_initted()
        return super().train(mode)

    def ema_step(self, vectors, codes, mask, sync, prev_codes=None, prev_codebook=None) -> None:
        kernels.ema_update(
            vectors, codes, self.cluster_size, self.embed_sum, self.codebook,
            decay=self.decay, eps=self.eps, mask=mask, prev_codes=prev_codes, prev_codebook=prev_codebook,
            sync=sync,
        )

    def track_usage(self, codes: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        k = self.codebook.shape[0]
        flat = codes.reshape(-1)
        weight = None if mask is None else mask.reshape(-1).to(torch.float32)
        counts = torch.zeros(k, device=flat.device).index_add_(
            0, flat.long(), torch.ones_like(flat, dtype=torch.float32) if weight is None else weight
        )
        self.recent_counts.mul_(_USAGE_DECAY).add_(counts)

    def restart_dead(self, vectors: torch.Tensor, codes: torch.Tensor, mask: Optional[torch.Tensor], sync: bool) -> None:
        """Codes whose EMA cluster size fell below the threshold restart from rows of this batch
        (vectors [..., D]; mask [...] bool: only True rows are picked), their cluster_size and
        embed_sum too. Rows are picked on the device from a hash of this batch's codes [...]; with
        sync, rank 0's picks are broadcast, so every rank restarts identically (and every rank runs
        the collective, dead codes or not, rows or not). No host sync, no data-dependent shapes."""
        if self.threshold_ema_dead_code <= 0:
            return
        d = vectors.shape[-1]
        flat = vectors.detach().reshape(-1, d).float()
        k, n = self.codebook.shape[0], flat.shape[0]
        # Systematic sampling: the i-th of the m dead codes takes the (offset + i * n_valid // m)-th
        # usable row, offset a hash of the batch's first codes (integers: the same in eager and
        # compiled code; new every batch, the same again when a resumed run replays it; no RNG):
        # distinct rows whenever the batch has m of them.
        head = codes.reshape(-1)[:_HASHED_CODES].to(torch.int64)
        weight = torch.arange(head.shape[0], device=flat.device, dtype=torch.int64) % 1021 + 1
        offset = ((head % _HASH_MODULUS) * weight).sum() % _HASH_MODULUS
        for _ in range(3):
            offset = (offset * _HASH_MULTIPLIER) % _HASH_MODULUS
        dead = self.cluster_size < self.threshold_ema_dead_code
        order = dead.to(torch.int64).cumsum(0)  # i + 1 at the i-th dead code
        n_dead = order[-1:].clamp_min(1)
        if mask is None:
            rows = (offset + (order - 1) * n // n_dead) % max(n, 1)
            has_rows = torch.full((), n > 0, device=flat.device)
        else:
            # The t-th True row: the first position where the running count of True rows passes t.
            running = mask.reshape(-1).to(torch.bool).to(torch.int64).cumsum(0)
            n_valid = running[-1:] if n > 0 else running.new_zeros(1)
            t = (offset + (order - 1) * n_valid // n_dead) % n_valid.clamp_min(1)
            rows = torch.searchsorted(running, t + 1).clamp_max(max(n - 1, 0))
            has_rows = n_valid[0] > 0
        picks = flat[rows] if n > 0 else flat.new_zeros(k, d)
        if sync:
            packed = torch.cat([picks, has_rows.to(picks.dtype).expand(k, 1)], dim=1)
            packed = _broadcast_from_rank0(packed)
            picks, has_rows = packed[:, :d], packed[0, d] > 0
        dead = dead & has_rows  # the same on every rank: cluster_size is all-reduced
        size = torch.full_like(self.cluster_size, float(self.threshold_ema_dead_code))
        self.codebook.copy_(torch.where(dead[:, None], picks, self.codebook))
        self.embed_sum.copy_(torch.where(dead[:, None], picks * self.threshold_ema_dead_code, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, size, self.cluster_size))

    @torch.no_grad()
    def init_from(self, samples: torch.Tensor, iters: int, sync: bool) -> None:
        """k-means on `samples` [..., D] (rank 0's result broadcast), then EMA state to match."""
        flat = samples.detach().reshape(-1, samples.shape[-1])
        centroids = kernels.kmeans(flat, self.codebook.shape[0], iters).to(self.codebook.dtype)
        if sync:
            centroids = _broadcast_from_rank0(centroids)
        self.codebook.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(centroids)
        self.recent_counts.zero_()
        self.initted.fill_(True)
        self._initted_flag = True
        if not torch.compiler.is_compiling():
            self._initted_seen = (self.initted, self.initted._version)

    def usage(self) -> dict:
        """{"used_fraction", "perplexity"} of the codes over this rank's recent training batches."""
        counts = self.recent_counts
        total = counts.sum()
        p = counts / total.clamp_min(1e-12)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        used = (counts > 1e-3 * total.clamp_min(1e-12) / counts.numel()).float().mean()
        return {"used_fraction": float(used) if total > 0 else 0.0, "perplexity": float(torch.exp(entropy)) if total > 0 else 0.0}


def _sync_enabled(sync_codebook: Optional[bool]) -> bool:
    return _distributed() if sync_codebook is None else bool(sync_codebook)


class VectorQuantizer(_EMACodebook):
    """VQ-VAE quantizer with an EMA codebook (DESIGN 1, Eq. 3).

    forward(x [..., dim], mask [...] bool = None) -> (quantized [..., dim] (dtype of x; straight-through
    gradient), codes int64 [...], loss scalar = commitment_weight * mean((x - sg(quantized))^2)).
    In training mode the codebook is updated by EMA from the codebook used for that forward (never by
    gradients); mask=False rows (padding) count for nothing. Buffers: codebook [K, D], cluster_size [K],
    embed_sum [K, D] (float32).
    sync_codebook: None = all_reduce the EMA statistics whenever torch.distributed is initialised with
    more than one rank; True/False force it.
    check_finite: how a NaN/Inf row of x fails. True: ValueError naming the row in eager mode on CPU
    tensors, a device-side assertion (no host sync) on other devices and under torch.compile;
    "raise": the ValueError everywhere (one host sync per step); "assert": always the assertion;
    False: no check.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        sync_codebook: Optional[bool] = None,
        check_finite: Union[bool, str] = True,
    ):
        super().__init__(dim, codebook_size, decay, eps, threshold_ema_dead_code)
        self.dim, self.codebook_size = dim, codebook_size
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.sync_codebook, self.check_finite = sync_codebook, _check_finite_mode(check_finite)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: x has last dimension {x.shape[-1]}, expected dim={self.dim}")
        sync = _sync_enabled(self.sync_codebook)
        if self.training and self.kmeans_init and self.kmeans_pending():
            # One-time: x[mask] has a data-dependent shape (a sync; a graph break under compile).
            self.init_from(x if mask is None else x[mask], self.kmeans_iters, sync)
        codebook = self.codebook.to(x.dtype)
        codes, dist_ = kernels.lookup(x, codebook, codes_dtype=torch.int64)
        if self.check_finite is not False:
            # A non-finite row of x has a non-finite distance: no extra pass over x.
            _check_finite(self.check_finite, dist_, "VectorQuantizer input x")
        quantized = torch.nn.functional.embedding(codes, codebook)
        if self.training:
            with torch.no_grad():
                self.ema_step(x, codes, mask, sync)
                self.track_usage(codes, mask)
                self.restart_dead(x, codes, mask, sync)
        weight = None if mask is None else mask.to(dist_.dtype)
        loss = _CommitmentLoss.apply(x, quantized.detach(), dist_, weight)
        return _StraightThrough.apply(x, quantized), codes, self.commitment_weight * loss

    @torch.no_grad()
    def reinit_kmeans(self, samples: torch.Tensor) -> None:
        """The one-time "repeated k-means" re-initialisation: k-means on samples [..., dim]."""
        self.init_from(samples, self.kmeans_iters, _sync_enabled(self.sync_codebook))


class HRQuantizer(nn.Module):
    """Hierarchical residual quantizer with residual doubling (DESIGN 2.2, Eq. 8).

    forward(zs: L tensors [..., dim], mask [...] bool = None) -> (zhat [..., dim] (the decoder input:
    mean of the L chosen code embeddings, straight-through: d zhat / d Z_0 = 1/L, / d Z_l = 2/L),
    codes int64 [L, ...], loss = commitment_weight * sum_l mean((Z_l - sg(zhat^(l)))^2)).
    Level l's codebook has codebook_sizes[l] codes and is EMA-updated on H_l (recomputed from Z_l and
    the previous level's codes, never stored). Other arguments as in `VectorQuantizer`.
    """

    def __init__(
        self,
        dim: int,
        codebook_sizes: Sequence[int] = (64, 512),
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.9,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        sync_codebook: Optional[bool] = None,
        check_finite: Union[bool, str] = True,
    ):
        super().__init__()
        if len(codebook_sizes) < 1:
            raise ValueError("HRQuantizer: codebook_sizes needs at least one level")
        self.dim, self.codebook_sizes = dim, tuple(int(k) for k in codebook_sizes)
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.sync_codebook, self.check_finite = sync_codebook, _check_finite_mode(check_finite)
        self.levels = nn.ModuleList(
            _EMACodebook(dim, k, decay, eps, threshold_ema_dead_code) for k in self.codebook_sizes
        )

    @property
    def codebooks(self) -> list[torch.Tensor]:
        """The L codebooks, [K_l, dim] float32."""
        return [level.codebook for level in self.levels]

    @staticmethod
    def _residuals(zs, codes, codebooks):
        """H_l for every level (float32), from Z_l, the previous level's codes and codebooks."""
        hs = [zs[0].float()]
        for level in range(1, len(zs)):
            prev = codebooks[level - 1][codes[level - 1]]
            # In the EMA's accumulation dtype, like its H_l (and alike in eager and compiled code,
            # which would not round a bfloat16 intermediate).
            acc = torch.float64 if zs[level].dtype == torch.float64 else torch.float32
            hs.append((2.0 * zs[level].to(acc) - prev.to(acc)).float())
        return hs

    def forward(self, zs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None):
        zs = list(zs)
        if len(zs) != len(self.levels):
            raise ValueError(f"HRQuantizer: got {len(zs)} inputs for {len(self.levels)} levels")
        for level, z in enumerate(zs):
            if z.shape[-1] != self.dim:
                raise ValueError(f"HRQuantizer: zs[{level}] has last dimension {z.shape[-1]}, expected dim={self.dim}")
            if self.check_finite is not False:
                bad_rows = torch.where(torch.isfinite(z.detach()).all(-1), 0.0, math.nan)
                _check_finite(self.check_finite, bad_rows, f"HRQuantizer input zs[{level}]")
        sync = _sync_enabled(self.sync_codebook)
        dtype = zs[0].dtype
        if self.training and self.kmeans_init and self.levels[0].kmeans_pending():
            self._init_levels(zs, mask, sync)
        # A copy: the EMA below rewrites the codebooks in place, and level l's H_l must be formed
        # with the level l-1 codebook that this forward used.
        used = [c.to(dtype, copy=True) for c in self.codebooks]
        codes, zhat_levels = kernels.hrq_quantize(zs, used)
        codes = codes.long()
        if self.training:
            with torch.no_grad():
                for level, state in enumerate(self.levels):
                    if level == 0:
                        state.ema_step(zs[0], codes[0], mask, sync)
                    else:
                        state.ema_step(
                            zs[level], codes[level], mask, sync,
                            prev_codes=codes[level - 1], prev_codebook=used[level - 1],
                        )
                    state.track_usage(codes[level], mask)
                if any(s.threshold_ema_dead_code > 0 for s in self.levels):
                    hs = self._residuals([z.detach() for z in zs], codes, used)
                    for state, h, level_codes in zip(self.levels, hs, codes):
                        state.restart_dead(h, level_codes, mask, sync)
        loss = zs[0].new_zeros((), dtype=torch.float32)
        for level, z in enumerate(zs):
            diff = (z.float() - zhat_levels[level].detach().float()).pow(2)
            if mask is not None:
                m = mask[..., None].float()
                loss = loss + (diff * m).sum() / (m.sum() * self.dim).clamp_min(1)
            else:
                loss = loss + diff.mean()
        return zhat_levels[-1], codes, self.commitment_weight * loss

    @torch.no_grad()
    def _init_levels(self, zs, mask, sync) -> None:
        """k-means per level in order: level l's samples are H_l from the freshly initialised l-1."""
        dtype = zs[0].dtype
        prev_codes = None
        for level, state in enumerate(self.levels):
            z = zs[level].detach()
            h = z if level == 0 else 2.0 * z - self.levels[level - 1].codebook.to(dtype)[prev_codes]
            state.init_from(h if mask is None else h[mask], self.kmeans_iters, sync)
            prev_codes, _ = kernels.lookup(h, state.codebook.to(dtype), codes_dtype=torch.int64)

    @torch.no_grad()
    def reinit_kmeans(self, zs: Sequence[torch.Tensor]) -> None:
        """The one-time "repeated k-means" re-initialisation of every level from samples zs (L tensors)."""
        self._init_levels(list(zs), None, _sync_enabled(self.sync_codebook))

    def usage(self) -> list[dict]:
        """Per level: {"used_fraction", "perplexity"} over the recent training batches."""
        return [state.usage() for state in self.levels]
