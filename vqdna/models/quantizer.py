"""Drop-in quantizer modules: `VectorQuantizer` (one EMA codebook) and `HRQuantizer` (hierarchical
residual quantization with residual doubling, docs/design.md §2.2). Both only call `vqdna.kernels`; the
backend is chosen there, never here.

Argument names follow vector-quantize-pytorch's `VectorQuantize` where the meaning is the same
(`dim`, `codebook_size`, `decay`, `eps`, `commitment_weight`, `kmeans_init`, `kmeans_iters`,
`threshold_ema_dead_code`, `sync_codebook`, and the peer's options listed in each module's docstring,
per level on `HRQuantizer`; `VectorQuantizer.from_vector_quantize` moves a peer module over). Differences: forward
returns (quantized, codes, loss) with codes int64 and the loss already weighted; the EMA state is
always float32 buffers named `codebook`, `cluster_size` and `embed_sum`; non-finite inputs raise a
ValueError naming the row (eager, CPU tensors) or fail a device-side assertion (CUDA tensors,
torch.compile): see `check_finite`.

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
# Rows per block of VectorQuantizer's Gumbel sampling (kernels.sample_codes): large blocks, because a
# small matmul repacks the whole codebook per call.
_SAMPLE_CHUNK = 4096


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
    per-row squared distances (no extra pass over x). x, q [..., D]; row_sqdist [...] float32 (or
    their sum [] without row_weight);
    row_weight [...] float32 or None (all ones). Backward: 2 w (x - q) / (D * sum(w)).
    normalized: the distances are of l2norm(x) (the quantize op's normalize): x in the formula is
    l2norm(x), recomputed in backward, and the gradient to x goes through l2norm's Jacobian."""

    @staticmethod
    def forward(x, quantized, row_sqdist, row_weight, normalized=False):
        if row_weight is None:  # row_sqdist may be the sum already (a 0-d tensor: the quantize op's)
            return (row_sqdist if row_sqdist.dim() == 0 else row_sqdist.sum()) / x.numel()
        return (row_sqdist * row_weight).sum() / (row_weight.sum().clamp_min(1) * x.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, quantized, _, row_weight = inputs[:4]
        ctx.save_for_backward(x, quantized, row_weight)
        ctx.normalized = len(inputs) > 4 and bool(inputs[4])

    @staticmethod
    def backward(ctx, grad):
        x, quantized, row_weight = ctx.saved_tensors
        diff = (_l2norm(x) if ctx.normalized else x).float() - quantized.float()
        if row_weight is None:
            gx = diff * (grad * 2.0 / x.numel())
        else:
            gx = diff * row_weight[..., None] * (grad * 2.0 / (row_weight.sum().clamp_min(1) * x.shape[-1]))
        gq = -gx.to(quantized.dtype) if ctx.needs_input_grad[1] else None  # a learnable codebook
        if ctx.normalized:
            gx = kernels.reference.l2norm_backward(x, gx)
        return gx.to(x.dtype), gq, None, None, None


class _RotationTrick(torch.autograd.Function):
    """The rotation trick (Fifty et al. 2024, arXiv:2410.06424, Sec. 4.2; vector-quantize-pytorch's
    `rotate_to`). Forward: the quantized value exactly; backward: the gradient to x is the one of
    x -> (|q|/|x|) R x, R the rotation taking x/|x| to q/|q| (R and the scale held constant):
    g_x = s (g - 2 (g.w) w + 2 (g.q^) u), u = x/|x|, q^ = q/|q|, w = l2norm(u + q^), s = |q|/|x|.
    x, q [..., D]; the norms clamp at 1e-6 like the peer's safe_div / l2norm."""

    @staticmethod
    def forward(x, quantized):
        return quantized.view_as(quantized)  # a view: quantized is also saved for backward

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, q = (t.float() for t in ctx.saved_tensors)
        g = grad.float()
        nx, nq = x.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
        u, qn = x / nx.clamp_min(1e-6), q / nq.clamp_min(1e-6)
        w = torch.nn.functional.normalize(u + qn, dim=-1, eps=1e-6)
        gx = g - 2.0 * (g * w).sum(-1, keepdim=True) * w + 2.0 * (g * qn).sum(-1, keepdim=True) * u
        return (gx * (nq / nx.clamp_min(1e-6))).to(ctx.saved_tensors[0].dtype), None


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim (eps 1e-6 as vector-quantize-pytorch's l2norm)."""
    return kernels.reference.l2norm(t)


def _orthogonal_loss(codebook: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Orthogonality loss of codebook [H, K, D] (arXiv:2112.00384 Eq. 2, as the peer's
    orthogonal_loss_fn): mean over heads of sum_ij cos(e_i, e_j)^2 / n^2 - 1/n, over the codes with
    weight [H, K] 1 (all K when None; n = their count, a tensor: no host sync). Computed as
    ||N^T diag(w) N||_F^2 with N the unit codes: a [D, D] Gram matrix, never K x K."""
    normed = _l2norm(codebook.float())
    if weight is None:
        gram, n = normed.transpose(1, 2) @ normed, codebook.new_full((), codebook.shape[1], dtype=torch.float32)
    else:
        gram = (normed * weight[..., None]).transpose(1, 2) @ normed
        n = weight.sum(-1).clamp_min(1)  # [H]
    per_head = gram.pow(2).sum((1, 2)) / n.pow(2) - 1.0 / n
    return per_head.mean()


def _orthogonal_reg(books: torch.Tensor, flat_codes: torch.Tensor, active_codes_only: bool,
                    max_codes: Optional[int]) -> torch.Tensor:
    """vector-quantize-pytorch's orthogonal regularisation of books [C, K, d] (a codebook parameter viewed
    per codebook), sync-free: over the codes used in this batch (flat_codes [...] int64 into C * K) with
    active_codes_only, over max_codes random codes (torch's global RNG, like the peer) when set."""
    c, k = books.shape[0], books.shape[1]
    weight = None
    if active_codes_only:
        weight = torch.zeros(c * k, device=flat_codes.device).index_fill_(0, flat_codes.reshape(-1), 1.0).view(c, k)
    m = max_codes
    if m is not None and m < k:
        if weight is None:  # as the peer: a random subset of m codes (torch.randperm)
            books = books[:, torch.randperm(k, device=books.device)[:m]]
        else:
            # m random active codes without reading how many are active: rank random keys, the
            # inactive codes last, and keep the first m (fewer active: all of them, weight 0 rest).
            keys = torch.rand(c, k, device=books.device) + (1.0 - weight) * 2.0
            pick = keys.argsort(-1)[:, :m]
            books = books.gather(1, pick[..., None].expand(-1, -1, books.shape[-1]))
            weight = weight.gather(1, pick)
    return _orthogonal_loss(books, weight)


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


def _check_finite(mode, row_dist: torch.Tensor, name: str, nonfinite: Optional[torch.Tensor] = None) -> None:
    """The NaN/Inf check of one input; row_dist [...] is non-finite exactly at its bad rows (the
    lookup's distances: no extra pass over the input). nonfinite: the quantize op's int64 [2] report
    (count, first row) of those rows, when there is one: then row_dist is only read to name the row.

    mode True: a ValueError naming the first bad row in eager mode on CPU tensors (reading a CPU
    tensor drains no queue), else a device-side assertion (no host sync). "raise": that ValueError
    on every device (one host sync per call). "assert": always the device-side assertion. Under
    torch.compile both are the assertion: a graph cannot branch on a value."""
    if mode is False:
        return
    if not torch.compiler.is_compiling() and (mode == "raise" or (mode is True and row_dist.device.type == "cpu")):
        if nonfinite is None or int(nonfinite[0]) > 0:
            kernels.raise_on_nonfinite(row_dist, name)
    else:
        ok = torch.isfinite(row_dist).all() if nonfinite is None else nonfinite[0] == 0
        torch._assert_async(ok, f"{name} holds NaN or Inf (check_finite='raise' names the row)")


class _EMACodebook(nn.Module):
    """One codebook with its float32 EMA state (docs/design.md §2.3) and usage statistics; or
    num_codebooks (a subclass's attribute, 1 here) codebooks of codebook_size / num_codebooks codes
    each, stacked in the same buffers (VectorQuantizer's per-head codebooks)."""

    num_codebooks = 1

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

    def make_codebook_parameter(self) -> None:
        """The codebook buffer becomes an nn.Parameter (same state-dict key), for a codebook that the
        optimizer (learnable_codebook) or the orthogonality loss moves."""
        self.codebook = nn.Parameter(self._buffers.pop("codebook"))

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

    def ema_step(self, vectors, codes, mask, sync, prev_codes=None, prev_codebook=None, target=None) -> None:
        """One EMA step; target: the codebook the kernel rewrites (default: this codebook)."""
        kernels.ema_update(
            vectors, codes, self.cluster_size, self.embed_sum, self.codebook if target is None else target,
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
        the collective, dead codes or not, rows or not). No host sync, no data-dependent shapes.
        C = num_codebooks > 1: vectors [..., C, D], codes [..., C], mask [...]: the dead codes of
        codebook c restart from head c of the rows, picked the same way from head c's codes."""
        if self.threshold_ema_dead_code <= 0:
            return
        c, d = self.num_codebooks, vectors.shape[-1]
        flat = vectors.detach().reshape(-1, c, d).float()  # [n, C, D]
        k, n = self.codebook.shape[0] // c, flat.shape[0]
        # Systematic sampling: the i-th of the m dead codes takes the (offset + i * n_valid // m)-th
        # usable row, offset a hash of the batch's first codes (integers: the same in eager and
        # compiled code; new every batch, the same again when a resumed run replays it; no RNG):
        # distinct rows whenever the batch has m of them. Per codebook: [C, ...] below.
        head = codes.reshape(-1, c)[:_HASHED_CODES].to(torch.int64)
        weight = torch.arange(head.shape[0], device=flat.device, dtype=torch.int64)[:, None] % 1021 + 1
        offset = ((head % _HASH_MODULUS) * weight).sum(0) % _HASH_MODULUS  # [C]
        for _ in range(3):
            offset = (offset * _HASH_MULTIPLIER) % _HASH_MODULUS
        offset = offset[:, None]
        dead = (self.cluster_size < self.threshold_ema_dead_code).view(c, k)
        order = dead.to(torch.int64).cumsum(-1)  # i + 1 at the i-th dead code of a codebook
        n_dead = order[:, -1:].clamp_min(1)
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
        books = torch.arange(c, device=flat.device)[:, None]
        picks = (flat[rows, books] if n > 0 else flat.new_zeros(c, k, d)).reshape(c * k, d)  # codebook c: head c's rows
        dead, k = dead.reshape(-1), c * k
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
        """k-means on `samples` [..., D] (rank 0's result broadcast), then EMA state to match.
        C = num_codebooks > 1: samples [..., C, D], and codebook c is k-means of head c's rows."""
        c = self.num_codebooks
        flat = samples.detach().reshape(-1, c, samples.shape[-1])
        k = self.codebook.shape[0] // c
        centroids = torch.cat([kernels.kmeans(flat[:, i], k, iters) for i in range(c)]).to(self.codebook.dtype)
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


def _channels_last(module: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """x as [B, ..., dim] (a strided view, no copy) and whether the output moves back, from the
    module's channel_last / accept_image_fmap / accept_3d_fmap (x [B, dim, ...] when one says so)."""
    image, three_d = module.accept_image_fmap, module.accept_3d_fmap
    move = (image or three_d or not module.channel_last) and x.ndim > 2
    if image and x.ndim != 4 or three_d and x.ndim != 5:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [B, dim, {'H, W' if image else 'D, H, W'}]")
    return (x.movedim(1, -1) if move else x), move


# vector-quantize-pytorch options that `VectorQuantizer` does not implement, with the value that
# means "off" (from_vector_quantize refuses a peer module that turns one on).
_PEER_UNSUPPORTED = {
    "directional_reparam": False, "commitment_use_cross_entropy_loss": False, "sync_update_v": 0.0,
    "in_place_codebook_optimizer": None, "route_gradients_to_input": True,
}


class VectorQuantizer(_EMACodebook):
    """VQ-VAE quantizer with an EMA codebook (docs/design.md §1, Eq. 3), with vector-quantize-pytorch's
    `VectorQuantize` options under its names (docs/design.md §5).

    forward(x [..., dim], mask [...] bool = None, freeze_codebook=None) -> (quantized [..., dim] (dtype
    of x; straight-through gradient, or the rotation trick), codes int64 [...] ([..., heads] with
    heads > 1), loss scalar = commitment_weight * mean((x - sg(quantized))^2) (+ orthogonal_reg_weight
    * the orthogonality loss in training)). With channel_last=False / accept_image_fmap /
    accept_3d_fmap, x is [B, dim, ...] and quantized too (a strided view of the result), codes [B, ...].
    In training mode the codebook is updated by EMA from the codebook used for that forward (unless
    ema_update=False, learnable_codebook, or freeze_codebook); mask=False rows (padding) count for
    nothing. Buffers: codebook [K * C, codebook_dim] (C = heads with separate_codebook_per_head, else 1;
    an nn.Parameter with learnable_codebook or orthogonal_reg_weight > 0), cluster_size [K * C],
    embed_sum [K * C, codebook_dim] (float32).

    Options as in the peer: codebook_dim (project_in/project_out Linear layers whenever
    heads * codebook_dim != dim), heads, separate_codebook_per_head (C = heads codebooks: all heads
    searched in one batched lookup and EMA-updated in one call; with kmeans_init codebook c is k-means
    of head c's rows, and its dead codes restart from head c's rows), use_cosine_sim (unit inputs and
    codes; the EMA codebook renormalised), rotation_trick, learnable_codebook, ema_update,
    freeze_codebook, orthogonal_reg_weight / _active_codes_only / _max_codes, stochastic_sample_codes /
    sample_codebook_temp (Gumbel-max over -distance / temp in training, from the global torch RNG: the
    peer's draws on the CPU; kernels.sample_codes), channel_last, accept_image_fmap, accept_3d_fmap, return_zeros_for_masked_padding.
    Differences on purpose: defaults decay=0.99, commitment_weight=0.5, rotation_trick=False (the peer:
    0.8, 1.0, True); the loss is also returned in eval mode; return_zeros_for_masked_padding=None (the
    default) returns every row's code and quantized value (the peer's True: zeros and code -1 at
    masked rows; False: the input and -1); the masked commitment loss compares with the projected,
    normalised input (the peer: with the raw input); on CUDA, stochastic_sample_codes draws Triton's
    Philox noise seeded from the CUDA generator (the same distribution, not the peer's numbers);
    k-means init is seeded k-means++ and dead-code restarts take hash-picked rows (the peer: random
    draws), and k-means init sets cluster_size to 1 (the peer: the cluster counts).
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
        *,
        codebook_dim: Optional[int] = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        use_cosine_sim: bool = False,
        rotation_trick: bool = False,
        learnable_codebook: bool = False,
        ema_update: Optional[bool] = None,
        freeze_codebook: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: Optional[int] = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        return_zeros_for_masked_padding: Optional[bool] = None,
    ):
        codebook_dim = dim if codebook_dim is None else int(codebook_dim)
        if heads < 1:
            raise ValueError(f"VectorQuantizer: heads must be >= 1, got {heads}")
        ema_update = not learnable_codebook if ema_update is None else bool(ema_update)
        if learnable_codebook and ema_update:
            raise ValueError("VectorQuantizer: learnable_codebook is not compatible with ema_update=True")
        if learnable_codebook and use_cosine_sim:
            raise ValueError("VectorQuantizer: learnable_codebook is not compatible with use_cosine_sim (as in the peer)")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("VectorQuantizer: accept_image_fmap and accept_3d_fmap are exclusive")
        n_books = heads if separate_codebook_per_head else 1
        if orthogonal_reg_active_codes_only and n_books > 1:
            raise ValueError("VectorQuantizer: orthogonal_reg_active_codes_only needs one codebook (as in the peer)")
        super().__init__(codebook_dim, codebook_size * n_books, decay, eps, threshold_ema_dead_code)
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.heads, self.separate_codebook_per_head, self.num_codebooks = heads, separate_codebook_per_head, n_books
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.sync_codebook, self.check_finite = sync_codebook, _check_finite_mode(check_finite)
        self.use_cosine_sim, self.rotation_trick = use_cosine_sim, rotation_trick
        self.learnable_codebook, self.ema_update, self.freeze_codebook = learnable_codebook, ema_update, freeze_codebook
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes, self.sample_codebook_temp = stochastic_sample_codes, sample_codebook_temp
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        if use_cosine_sim:
            with torch.no_grad():
                self.codebook.copy_(_l2norm(self.codebook))
                self.embed_sum.copy_(self.codebook)
        if learnable_codebook or orthogonal_reg_weight > 0:
            self.make_codebook_parameter()
        # (codebook buffer, its version, the search's codebook, its ||e_k||^2 [K]): _search_codebook
        self._sqnorm_cache: tuple = (None, -1, None, None)
        self.has_projections = codebook_dim * heads != dim
        self.project_in = nn.Linear(dim, codebook_dim * heads) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim * heads, dim) if self.has_projections else nn.Identity()

    # -- vector-quantize-pytorch interop ---------------------------------------------------------

    @classmethod
    def from_vector_quantize(cls, peer: nn.Module, **overrides) -> "VectorQuantizer":
        """A VectorQuantizer with the options and current state (codebook, EMA statistics,
        k-means flag, projections) of a vector-quantize-pytorch `VectorQuantize` module `peer`, so
        a checkpoint moves over. The peer's defaults that ours do not share are taken from `peer`
        (decay, commitment_weight, rotation_trick, return_zeros_for_masked_padding). Raises
        ValueError naming a peer option that is on and not supported here. overrides: constructor
        arguments to set differently (e.g. check_finite)."""
        for name, off in _PEER_UNSUPPORTED.items():
            value = getattr(peer, name, off)
            if value is not off and value != off:
                raise ValueError(f"from_vector_quantize: the peer's {name}={value!r} is not supported")
        book = peer._codebook
        for name in ("affine_param", "vq_bridge", "manual_ema_update"):
            if getattr(book, name, None) not in (None, False):
                raise ValueError(f"from_vector_quantize: the peer's {name} is not supported")
        if getattr(peer, "has_codebook_diversity_loss", False):
            raise ValueError("from_vector_quantize: the peer's codebook_diversity_loss_weight is not supported")
        if isinstance(peer.project_in, nn.Sequential):
            raise ValueError("from_vector_quantize: the peer's layernorm_after_project_in is not supported")
        sample = book.gumbel_sample.keywords if hasattr(book.gumbel_sample, "keywords") else {}
        if sample.get("straight_through", False):
            raise ValueError("from_vector_quantize: the peer's straight_through (Gumbel) is not supported")
        kwargs = dict(
            dim=peer.dim, codebook_size=peer.codebook_size, decay=book.decay, eps=book.eps,
            commitment_weight=peer.commitment_weight if peer.has_commitment_loss else 0.0,
            kmeans_init=not bool(book.initted), kmeans_iters=book.kmeans_iters,
            threshold_ema_dead_code=book.threshold_ema_dead_code, sync_codebook=book.use_ddp,
            codebook_dim=book.embed.shape[-1], heads=peer.heads, separate_codebook_per_head=peer.separate_codebook_per_head,
            use_cosine_sim=peer.use_cosine_sim, rotation_trick=bool(peer.rotation_trick),
            learnable_codebook=bool(peer.learnable_codebook), ema_update=bool(book.ema_update),
            freeze_codebook=peer.freeze_codebook, orthogonal_reg_weight=peer.orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=peer.orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=peer.orthogonal_reg_max_codes,
            stochastic_sample_codes=bool(sample.get("stochastic", False)), sample_codebook_temp=book.sample_codebook_temp,
            channel_last=peer.channel_last, accept_image_fmap=peer.accept_image_fmap, accept_3d_fmap=peer.accept_3d_fmap,
            return_zeros_for_masked_padding=peer.return_zeros_for_masked_padding,
        )
        kwargs.update(overrides)
        module = cls(**kwargs)
        module.load_state_dict(cls.state_from_vector_quantize(peer.state_dict()), strict=False)
        return module.to(book.embed.device)

    @staticmethod
    def state_from_vector_quantize(peer_state: dict) -> dict:
        """Our state-dict entries from a `VectorQuantize` state dict: _codebook.embed [C, K, d] ->
        codebook [C * K, d]; _codebook.embed_avg -> embed_sum; _codebook.cluster_size [C, K] ->
        cluster_size [C * K]; _codebook.initted -> initted; project_in/out.* as they are."""
        out = {}
        for key, value in peer_state.items():
            if key == "_codebook.embed":
                out["codebook"] = value.reshape(-1, value.shape[-1]).float()
            elif key == "_codebook.embed_avg":
                out["embed_sum"] = value.reshape(-1, value.shape[-1]).float()
            elif key == "_codebook.cluster_size":
                out["cluster_size"] = value.reshape(-1).float()
            elif key == "_codebook.initted":
                out["initted"] = value.clone()
            elif key.startswith(("project_in.", "project_out.")):
                out[key] = value
        return out

    # -- forward ---------------------------------------------------------------------------------

    def _sample_codes(self, z: torch.Tensor, codebooks: torch.Tensor, temp: float):
        """Gumbel-max codes [..., C] (or [...] with C = 1) of z [..., C, d] ([..., d]) over logits
        -distance / temp (cosine: z.e / temp) per codebook of codebooks [C, K, d], from the global
        torch RNG: one kernels.sample_codes call for all codebooks (per-head codebooks: z as [rows, C,
        d], a view, with codebooks [C, K, d]), in blocks of _SAMPLE_CHUNK rows. On the CPU the peer's
        draws in its order (the uniforms of [C, rows, K], row-major: codebook 0's first; the blocks
        draw the same numbers); on CUDA the fused Triton kernel's Philox draws (its "auto"; counters
        (c rows + i) K + k). Also the chosen rows [..., (C,) d] float32 and their squared distances
        [..., (C)] float32."""
        c, d = codebooks.shape[0], z.shape[-1]
        rows = z.reshape(-1, c, d).float()
        e = codebooks.float()
        if c == 1:  # one codebook: the [rows, d] form
            rows, e = rows[:, 0], e[0]
        codes, quantized, dist = kernels.sample_codes(rows, e, temp, cosine=self.use_cosine_sim, block_rows=_SAMPLE_CHUNK)
        return codes.reshape(z.shape[:-1]), quantized.reshape(z.shape), dist.reshape(z.shape[:-1])

    def _search_codebook(self, dtype: torch.dtype, learn: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The codebook the search uses: the buffer in `dtype`, with use_cosine_sim its unit rows
        (detached unless learn), and its ||e_k||^2 [K] float32 as the lookup wrapper computes it. Both
        are kept while the float32 buffer is the same tensor at the same version (eval calls: no small
        passes per call); sqnorm is None where nothing is cached (compiled code, another dtype, a
        learnable codebook): the op computes it then."""
        book = self.codebook
        if learn or torch.compiler.is_compiling() or dtype != torch.float32 or book.dtype != torch.float32:
            codebook = book.to(dtype)
            if self.use_cosine_sim:
                codebook = _l2norm(codebook)
            return (codebook if learn else codebook.detach()), None
        cached, version, unit, sq = self._sqnorm_cache
        if cached is not book or version != book._version:
            unit = _l2norm(book.detach()) if self.use_cosine_sim else book.detach()
            sq = unit.pow(2).sum(-1)
            self._sqnorm_cache = (book, book._version, unit, sq)
        return unit, sq

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, freeze_codebook: Optional[bool] = None):
        x, move_back = _channels_last(self, x, "VectorQuantizer: x")
        if x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: x has last dimension {x.shape[-1]}, expected dim={self.dim}")
        sync = _sync_enabled(self.sync_codebook)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        h, c, k = self.heads, self.num_codebooks, self.codebook_size
        z = self.project_in(x)
        if h > 1:
            z = z.unflatten(-1, (h, self.codebook_dim))  # heads fold into rows: one lookup
        # Channel-first z on the CPU (x [B, dim, ...] viewed as [B, ..., dim]) goes to the lookup, whose
        # native kernel reads it in place: the fused op would first copy z into rows.
        channel_first = move_back and z.device.type == "cpu" and z.stride(-1) != 1 and z.stride(-2) == 1
        # Cosine in eval: the fused op normalises z itself (in cache, natively: no pass over z) and its
        # autograd formula includes l2norm's; training keeps the unit z (k-means, the EMA, restarts), and
        # so does the rotation trick's gradient (it rotates the unit z).
        normalize_in_op = (self.use_cosine_sim and not self.training and c == 1 and not channel_first
                           and not (self.rotation_trick and z.requires_grad and torch.is_grad_enabled()))
        if self.use_cosine_sim and not normalize_in_op:
            z = _l2norm(z)
        rows_mask = mask if mask is None or h == 1 else mask[..., None].expand(z.shape[:-1])
        if self.training and self.kmeans_init and self.kmeans_pending():
            # One-time: z[mask] has a data-dependent shape (a sync; a graph break under compile).
            with torch.no_grad():
                zd = z.detach()
                # per-head codebooks: k-means of each head's rows ([rows, C, d]); one codebook: of all rows
                self.init_from(zd if mask is None else zd[mask if c > 1 else rows_mask], self.kmeans_iters, sync)
                if self.use_cosine_sim:
                    self.codebook.copy_(_l2norm(self.codebook))
        learn = self.learnable_codebook and not frozen
        codebook, codebook_sqnorm = self._search_codebook(z.dtype, learn)
        sample = self.stochastic_sample_codes and self.training and self.sample_codebook_temp > 0
        # One codebook, nearest codes, no codebook gradient: the fused op finds the codes and writes the
        # chosen rows (with the straight-through gradient) and the distances in one pass over z.
        fused = c == 1 and not sample and not learn and not channel_first
        if sample:
            with torch.no_grad():
                # Shared-codebook heads of a [B, N, H, d] input: rows in the peer's (B, H, N) order,
                # so the same seed draws the same noise per row.
                peer_order = h > 1 and c == 1 and z.ndim == 4
                zs = z.detach().transpose(1, 2) if peer_order else z.detach()
                sampled = self._sample_codes(zs, codebook.detach().view(c, k, -1), self.sample_codebook_temp)
                # codes, the chosen rows (float32) and the sampled codes' squared distances (non-finite
                # where z is), back in z's order
                codes, sampled_rows, dist_ = (t.transpose(1, 2) for t in sampled) if peer_order else sampled
        elif fused:
            codes, quantized_st, dist_, sqdist_sum, nonfinite = kernels.quantize(
                z, codebook, codebook_sqnorm=codebook_sqnorm, codes_dtype=torch.int64,
                normalize=normalize_in_op)
        elif c == 1:
            codes, dist_ = kernels.lookup(z, codebook, codes_dtype=torch.int64)
        else:  # per-head codebooks: all heads in one lookup (codes, dist [..., C])
            codes, dist_ = kernels.lookup(
                z, codebook.view(c, k, -1), codes_dtype=torch.int64,
                codebook_sqnorm=None if codebook_sqnorm is None else codebook_sqnorm.view(c, k))
        flat_codes = codes if c == 1 else codes + torch.arange(c, device=codes.device) * k
        if fused:
            quantized = quantized_st.detach()
        elif sample and not learn:  # codebook rows, exact in z's dtype
            quantized = sampled_rows.to(z.dtype)
        else:
            quantized = torch.nn.functional.embedding(flat_codes, codebook)
        if self.check_finite is not False:
            # A non-finite row of x has a non-finite distance: no extra pass over x.
            _check_finite(self.check_finite, dist_, "VectorQuantizer input x", nonfinite if fused else None)
        if self.training and not frozen:
            with torch.no_grad():
                zd = z.detach()
                if self.ema_update or self.threshold_ema_dead_code > 0:
                    # Without ema_update the statistics still feed dead-code restarts (as the peer):
                    # the codebook the kernel rewrites is then a scratch copy.
                    target = self.codebook.detach() if self.ema_update else self.codebook.detach().clone()
                    # Per-head codebooks: the state as [C, K] / [C, K, d] views, one call for all of
                    # them (per-codebook Laplace smoothing).
                    kernels.ema_update(zd, codes, self.cluster_size.view(c, k).squeeze(0),
                                       self.embed_sum.view(c, k, -1).squeeze(0), target.view(c, k, -1).squeeze(0),
                                       decay=self.decay, eps=self.eps, mask=rows_mask, sync=sync)
                    if self.ema_update and self.use_cosine_sim:
                        self.codebook.copy_(_l2norm(self.codebook))
                self.track_usage(flat_codes, rows_mask)
                self.restart_dead(zd, codes, rows_mask if c == 1 else mask, sync)
        weight = None if rows_mask is None else rows_mask.to(dist_.dtype)
        # The loss is its own graph node (the op's sqdist_sum detached): the output and the loss then
        # backward independently (autograd.grad on each, as before).
        sqdist = (sqdist_sum if weight is None else dist_).detach() if fused else dist_
        loss = self.commitment_weight * _CommitmentLoss.apply(
            z, quantized if learn else quantized.detach(), sqdist, weight, normalize_in_op)
        if self.training and self.orthogonal_reg_weight > 0:
            loss = loss + self.orthogonal_reg_weight * self._orthogonal_reg(flat_codes)
        if z.requires_grad and self.rotation_trick:
            out = _RotationTrick.apply(z, quantized)
        elif fused:
            out = quantized_st
        else:
            out = _StraightThrough.apply(z, quantized) if z.requires_grad else quantized
        if h > 1:
            out = out.flatten(-2)
        out = self.project_out(out)
        if mask is not None and self.return_zeros_for_masked_padding is not None:
            drop = ~mask[..., None]
            if not self.return_zeros_for_masked_padding:
                out = torch.where(drop, x, out)
            elif out.requires_grad:
                out = out.masked_fill(drop, 0.0)
            else:  # out is this call's own tensor: zero the padding rows in place (no [..., dim] zeros)
                out.masked_fill_(drop, 0.0)
            codes = codes.masked_fill(~rows_mask if h > 1 else drop[..., 0], -1)  # not in place: embedding saved it
        if move_back:
            out = out.movedim(-1, 1)
        return out, codes, loss

    def _orthogonal_reg(self, flat_codes: torch.Tensor) -> torch.Tensor:
        """The peer's orthogonal regularisation of the codebook parameter [C * K, d], sync-free."""
        return _orthogonal_reg(self.codebook.view(self.num_codebooks, self.codebook_size, -1), flat_codes,
                               self.orthogonal_reg_active_codes_only, self.orthogonal_reg_max_codes)

    @torch.no_grad()
    def reinit_kmeans(self, samples: torch.Tensor) -> None:
        """The one-time "repeated k-means" re-initialisation: k-means on samples [..., codebook_dim]
        ([..., heads, codebook_dim] with separate_codebook_per_head: codebook c from head c)."""
        self.init_from(samples, self.kmeans_iters, _sync_enabled(self.sync_codebook))


# vector-quantize-pytorch options that HRQuantizer does not offer: (the value that means "off", why).
_HRQ_NOT_OFFERED = {
    "use_cosine_sim": (False, "the doubled residual H_l = 2 Z_l - C_{l-1}[M_{l-1}] of unit vectors is not a unit "
                              "vector and the decoder input is the Euclidean mean of the levels' code vectors: "
                              "a cosine lookup is not the method (docs/design.md §2.2)"),
    "heads": (1, "the levels already split the code; heads would make each level a product quantizer with "
                 "per-head residual chains, another method (docs/design.md §2.2)"),
    "separate_codebook_per_head": (False, "no heads (see heads)"),
    "codebook_dim": (None, "H_l mixes Z_l with the previous level's code vectors, so every level works in the "
                           "encoder's dim; a projection belongs to the encoder that produces the zs"),
}

_PerLevel = Union[bool, float, int, None, Sequence]


def _per_level(name: str, value, n_levels: int, cast) -> tuple:
    """An HRQuantizer option as one value per level: a scalar for every level, or a sequence of L."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_levels:
            raise ValueError(f"HRQuantizer: {name} has {len(value)} values for {n_levels} levels")
        return tuple(cast(v) for v in value)
    return (cast(value),) * n_levels


def _must_save_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda *args, **kwargs: CheckpointPolicy.MUST_SAVE)


def _saved(fn, *args):
    """fn(*args); under torch.compile, with every value it computes saved for the backward
    (selective activation checkpointing, MUST_SAVE). fn gathers code rows from copies of the codebooks;
    the compiled graph reads the codebook buffers themselves (the copy of an input is elided), and
    AOTAutograd's partitioner would recompute the rows in the backward, after the training step's
    EMA has rewritten those buffers in place: wrong gradients (the bug open PR pytorch/pytorch#197039
    addresses; caught by tests/models/test_hrq_options.py::test_option_steps_compile_fullgraph)."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, context_fn=_must_save_context)


def _optional_int(v) -> Optional[int]:
    return None if v is None else int(v)


class HRQuantizer(nn.Module):
    """Hierarchical residual quantizer with residual doubling (docs/design.md §2.2, Eq. 8).

    forward(zs: L tensors [..., dim], mask [...] bool = None, freeze_codebook=None) -> (zhat [..., dim]
    (the decoder input: mean of the L chosen code embeddings, straight-through: d zhat / d Z_0 = 1/L,
    / d Z_l = 2/L), codes int64 [L, ...], loss = commitment_weight * sum_l mean((Z_l - sg(zhat^(l)))^2)
    (+ the orthogonality losses in training)). Level l's codebook has codebook_sizes[l] codes and is
    EMA-updated on H_l (recomputed from Z_l and the previous level's codes, never stored). Other
    arguments as in `VectorQuantizer`.

    vector-quantize-pytorch's options, keyword-only with the peer's names and defaults; those marked
    "per level" take one value for every level or a sequence of L values (level 0 first):
    - learnable_codebook, ema_update (default: not learnable_codebook), freeze_codebook (per level; the
      forward's freeze_codebook overrides for one call): a learnable level's codebook is an
      nn.Parameter that gets the commitment loss's gradient (the loss compares Z_l with the cumulative
      mean zhat^(l) of the codes of levels 0..l, so level m's codes get the gradient of every level
      l >= m); zhat's own gradient stays straight-through to the zs. ema_update=False: no EMA (the
      statistics still feed dead-code restarts); frozen: no EMA, usage or restarts.
    - orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes (per level):
      the peer's orthogonality loss of level l's codebook (an nn.Parameter where the weight is > 0),
      added in training.
    - stochastic_sample_codes, sample_codebook_temp (per level): in training, level l's code is a
      Gumbel-max sample over -||H_l - e_k|| / temp (kernels.sample_codes, the global torch RNG: on the
      CPU the peer's uniforms, on CUDA the Triton backend's Philox noise from a seed drawn from it), H_l
      formed from level l-1's sampled code; eval takes the nearest codes (the fused hrq_quantize).
    - rotation_trick (per level): each level is a VQ of H_l, so zhat's gradient reaches H_l through
      the rotation taking H_l to its code vector (instead of straight through), then Z_l (x 2 for l >= 1).
    - channel_last=False, accept_image_fmap, accept_3d_fmap: every Z_l is [B, dim, ...] and zhat too
      (strided views; the fused op still copies a channel-first Z_l into rows once).
    - return_zeros_for_masked_padding=True: zeros in zhat and code -1 at every level where mask is
      False (None, the default: every row keeps its codes). False (the peer returns its input there)
      is refused: HRQ has L inputs and none of them is the unquantized zhat.
    Not offered (ValueError naming the reason): use_cosine_sim (residual doubling of unit vectors is
    not the method), heads / separate_codebook_per_head (per-head residual chains are another method),
    codebook_dim (H_l mixes levels, so every level works in the encoder's dim).
    With none of these options the forward is the one fused hrq_quantize pass.
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
        *,
        rotation_trick: _PerLevel = False,
        learnable_codebook: _PerLevel = False,
        ema_update: _PerLevel = None,
        freeze_codebook: _PerLevel = False,
        orthogonal_reg_weight: _PerLevel = 0.0,
        orthogonal_reg_active_codes_only: _PerLevel = False,
        orthogonal_reg_max_codes: _PerLevel = None,
        stochastic_sample_codes: _PerLevel = False,
        sample_codebook_temp: _PerLevel = 1.0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        return_zeros_for_masked_padding: Optional[bool] = None,
        **not_offered,
    ):
        super().__init__()
        if len(codebook_sizes) < 1:
            raise ValueError("HRQuantizer: codebook_sizes needs at least one level")
        for name, value in not_offered.items():
            if name not in _HRQ_NOT_OFFERED:
                raise TypeError(f"HRQuantizer: unexpected keyword argument {name!r}")
            off, why = _HRQ_NOT_OFFERED[name]
            if value != off and not (name == "codebook_dim" and value == dim):
                raise ValueError(f"HRQuantizer: {name}={value!r} is not offered: {why}")
        n = len(codebook_sizes)
        learnable = _per_level("learnable_codebook", learnable_codebook, n, bool)
        ema = tuple(not lc if e is None else bool(e)
                    for lc, e in zip(learnable, _per_level("ema_update", ema_update, n, lambda v: v)))
        if any(lc and e for lc, e in zip(learnable, ema)):
            raise ValueError("HRQuantizer: learnable_codebook is not compatible with ema_update=True (at a level)")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("HRQuantizer: accept_image_fmap and accept_3d_fmap are exclusive")
        if return_zeros_for_masked_padding is False:
            raise ValueError("HRQuantizer: return_zeros_for_masked_padding=False is not offered: the peer returns "
                             "its input at masked rows, and HRQ's L inputs hold no unquantized zhat (use True or None)")
        self.dim, self.codebook_sizes = dim, tuple(int(k) for k in codebook_sizes)
        self.commitment_weight = commitment_weight
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.sync_codebook, self.check_finite = sync_codebook, _check_finite_mode(check_finite)
        self.learnable_codebook, self.ema_update = learnable, ema
        # Per-level options the forward reads (a scalar assigned later applies to every level).
        for name, value, cast in (("freeze_codebook", freeze_codebook, bool), ("rotation_trick", rotation_trick, bool),
                                  ("stochastic_sample_codes", stochastic_sample_codes, bool),
                                  ("sample_codebook_temp", sample_codebook_temp, float)):
            _per_level(name, value, n, cast)  # the lengths checked here, not at the first forward
        self.freeze_codebook, self.rotation_trick = freeze_codebook, rotation_trick
        self.orthogonal_reg_weight = _per_level("orthogonal_reg_weight", orthogonal_reg_weight, n, float)
        self.orthogonal_reg_active_codes_only = _per_level(
            "orthogonal_reg_active_codes_only", orthogonal_reg_active_codes_only, n, bool)
        self.orthogonal_reg_max_codes = _per_level("orthogonal_reg_max_codes", orthogonal_reg_max_codes, n, _optional_int)
        self.stochastic_sample_codes, self.sample_codebook_temp = stochastic_sample_codes, sample_codebook_temp
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.levels = nn.ModuleList(
            _EMACodebook(dim, k, decay, eps, threshold_ema_dead_code) for k in self.codebook_sizes
        )
        for state, lc, w in zip(self.levels, learnable, self.orthogonal_reg_weight):
            if lc or w > 0:
                state.make_codebook_parameter()

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

    def forward(self, zs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None,
                freeze_codebook: _PerLevel = None):
        zs = list(zs)
        n = len(self.levels)
        if len(zs) != n:
            raise ValueError(f"HRQuantizer: got {len(zs)} inputs for {n} levels")
        moved = [_channels_last(self, z, f"HRQuantizer: zs[{level}]") for level, z in enumerate(zs)]
        zs, move_back = [m[0] for m in moved], moved[0][1]
        for level, z in enumerate(zs):
            if z.shape[-1] != self.dim:
                raise ValueError(f"HRQuantizer: zs[{level}] has last dimension {z.shape[-1]}, expected dim={self.dim}")
        frozen = _per_level("freeze_codebook", self.freeze_codebook if freeze_codebook is None else freeze_codebook,
                            n, bool)
        learn = tuple(lc and not f for lc, f in zip(self.learnable_codebook, frozen))
        temps = _per_level("sample_codebook_temp", self.sample_codebook_temp, n, float)
        sample = tuple(self.training and s and t > 0
                       for s, t in zip(_per_level("stochastic_sample_codes", self.stochastic_sample_codes, n, bool), temps))
        needs_grad = torch.is_grad_enabled() and any(z.requires_grad for z in zs)
        rotate = tuple(needs_grad and r for r in _per_level("rotation_trick", self.rotation_trick, n, bool))
        sync = _sync_enabled(self.sync_codebook)
        dtype = zs[0].dtype
        if self.training and self.kmeans_init and self.levels[0].kmeans_pending():
            if self.check_finite is not False:  # once: k-means must not learn from a bad batch
                for level, z in enumerate(zs):
                    bad_rows = torch.where(torch.isfinite(z.detach()).all(-1), 0.0, math.nan)
                    _check_finite(self.check_finite, bad_rows, f"HRQuantizer input zs[{level}]")
            self._init_levels(zs, mask, sync)
        # A copy: the EMA below rewrites the codebooks in place, and level l's H_l must be formed
        # with the level l-1 codebook that this forward used.
        used = [c.detach().to(dtype, copy=True) for c in self.codebooks]
        if any(sample):
            # Level by level (H_l needs level l-1's sampled code); zhat_levels carries the gradient.
            codes = self._sample_level_codes(zs, used, sample, temps)
            zhat_levels = _saved(self._levels_output, zs, used, codes, rotate)
            d = self.dim
            sqdist, sqdist_sum, nonfinite = kernels.reference.hrq_level_losses(
                [z.reshape(-1, d) for z in zs], zhat_levels.reshape(n, -1, d))
            sqdist = sqdist.view(codes.shape)
        else:
            # One pass: codes, zhat_levels and, per level, the loss's ||Z_l - zhat_levels[l]||^2 rows
            # and their sum and the non-finite rows (a row of Z_l holding NaN/Inf has a non-finite sqdist).
            codes, zhat_levels, sqdist, sqdist_sum, nonfinite = kernels.hrq_quantize(zs, used, losses=True)
        if self.check_finite is not False:
            for level in range(n):
                _check_finite(self.check_finite, sqdist[level], f"HRQuantizer input zs[{level}]", nonfinite[level])
        codes = codes.long()
        # The learnable levels' codebook gradient goes through the commitment loss's targets
        # zhat^(l) = mean_{m<=l} C_m[M_m]: taken before restarts rewrite codebook rows.
        targets = self._commitment_targets(codes, used, learn) if any(learn) else None
        if self.training:
            self._update_levels(zs, codes, used, mask, sync, frozen)
        weight = None if mask is None else mask.to(sqdist.dtype)
        if targets is not None:
            # The target's value is zhat_levels[l] (what sqdist measured); t - sg(t) (exactly 0) carries the
            # codebook gradient. A value that is not read from the codebooks: a compiled backward that
            # recomputes it cannot read a codebook the EMA has rewritten since (see _saved).
            loss = sum(_CommitmentLoss.apply(z, zhat_levels[level].detach().float() + (t - t.detach()),
                                             (sqdist[level] if weight is not None else sqdist_sum[level]).detach(),
                                             weight, False) for level, (z, t) in enumerate(zip(zs, targets)))
        elif weight is not None:
            # sum_l mean((Z_l - sg(zhat_levels[l]))^2) over the unmasked rows, from the op's sums; its
            # autograd gives d/dZ_l = 2 (Z_l - zhat_levels[l]) / (rows D).
            loss = (sqdist * weight).sum() / (weight.sum() * self.dim).clamp_min(1)
        else:
            loss = sqdist_sum.sum() / zs[0].numel()
        loss = self.commitment_weight * loss
        if self.training:
            for level, state in enumerate(self.levels):
                if self.orthogonal_reg_weight[level] > 0:
                    loss = loss + self.orthogonal_reg_weight[level] * _orthogonal_reg(
                        state.codebook[None], codes[level], self.orthogonal_reg_active_codes_only[level],
                        self.orthogonal_reg_max_codes[level])
        if any(rotate) and not any(sample):  # the fused op's zhat is straight-through
            zhat = _saved(self._levels_output, zs, used, codes, rotate)[-1]
        else:
            zhat = zhat_levels[-1]
        if mask is not None and self.return_zeros_for_masked_padding:
            drop = ~mask
            zhat = zhat.masked_fill(drop[..., None], 0.0)
            codes = codes.masked_fill(drop, -1)
        if move_back:
            zhat = zhat.movedim(-1, 1)
        return zhat, codes, loss

    def _sample_level_codes(self, zs, used, sample, temps) -> torch.Tensor:
        """Codes int64 [L, ...]: level by level, a Gumbel-max sample (kernels.sample_codes) at the
        sampled levels, the nearest code elsewhere, of H_l formed (as the fused op does, in the dtype of
        zs) from the previous level's chosen code."""
        codes, prev = [], None
        with torch.no_grad():
            for level, z in enumerate(zs):
                h = z.detach() if level == 0 else 2.0 * z.detach() - used[level - 1][prev]
                if sample[level]:
                    c = kernels.sample_codes(h.reshape(-1, self.dim).float(), used[level].float(), temps[level],
                                             block_rows=_SAMPLE_CHUNK)[0].view(h.shape[:-1])
                else:
                    c, _ = kernels.lookup(h, used[level], codes_dtype=torch.int64)
                codes.append(c)
                prev = c
        return torch.stack(codes)

    @staticmethod
    def _levels_output(zs, used, codes, rotate) -> torch.Tensor:
        """zhat_levels [L, ..., D] (dtype of zs; the cumulative means of the chosen code vectors, summed
        in float32 as the fused op) with each level's gradient to H_l (Z_0; 2 Z_l - sg(C_{l-1}[M_{l-1}]))
        straight through, or through the rotation trick where rotate[l]."""
        acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
        levels, running, prev = [], None, None
        for level, z in enumerate(zs):
            hhat = used[level][codes[level]].to(acc)
            h = z.to(acc) if level == 0 else 2.0 * z.to(acc) - prev
            out = (_RotationTrick if rotate[level] else _StraightThrough).apply(h, hhat)
            running = out if running is None else running + out
            levels.append((running / (level + 1)).to(z.dtype))
            prev = hhat
        return torch.stack(levels)

    def _commitment_targets(self, codes, used, learn) -> list[torch.Tensor]:
        """zhat^(l) [..., D] float32 per level, differentiable to the learnable levels' codebooks."""
        targets, running = [], None
        for level, state in enumerate(self.levels):
            book = state.codebook if learn[level] else used[level]
            e = torch.nn.functional.embedding(codes[level], book).float()
            running = e if running is None else running + e
            targets.append(running / (level + 1))
        return targets

    @torch.no_grad()
    def _update_levels(self, zs, codes, used, mask, sync, frozen) -> None:
        """The training step's EMA (on H_l, from the codebooks used), usage and dead-code restarts of
        the levels not frozen; ema_update=False levels keep their codebook (a scratch copy is rewritten)."""
        for level, state in enumerate(self.levels):
            if frozen[level]:
                continue
            if self.ema_update[level] or state.threshold_ema_dead_code > 0:
                target = None if self.ema_update[level] else state.codebook.detach().clone()
                if target is None and isinstance(state.codebook, nn.Parameter):
                    target = state.codebook.detach()
                prev = {} if level == 0 else dict(prev_codes=codes[level - 1], prev_codebook=used[level - 1])
                state.ema_step(zs[level], codes[level], mask, sync, target=target, **prev)
            state.track_usage(codes[level], mask)
        if any(s.threshold_ema_dead_code > 0 and not f for s, f in zip(self.levels, frozen)):
            hs = self._residuals([z.detach() for z in zs], codes, used)
            for state, h, level_codes, f in zip(self.levels, hs, codes, frozen):
                if not f:
                    state.restart_dead(h, level_codes, mask, sync)

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
