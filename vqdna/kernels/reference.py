"""The executable spec (docs/design.md §2): pure PyTorch, written for clarity, float64-capable.

Every fast backend of every op is tested against the function of the same name here.
Conventions: z is [N, D]; a codebook is [K, D]; codes are int32; reductions accumulate in float32
(or float64 when the inputs are float64); TF32 is never used.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch

from vqdna.data.alphabet import NUM_BASES  # A C G T N
from vqdna.data.alphabet import PAD as BASE_PAD_ID  # "no base here": adds nothing to the stem, like Conv1d's zero padding
from vqdna.kernels.compile_marks import assume_constant_result

__all__ = [
    "lookup", "hrq_quantize", "ema_stats", "ema_update", "laplace_smoothed", "kmeans", "kmeans_init", "stem",
    "convnext_block", "hrq_level_losses", "nonfinite_report", "l2norm", "l2norm_backward", "sample_codes",
    "sample_codes_philox", "philox_scores", "philox_uniform",
    "BASE_PAD_ID", "NUM_BASES", "EMA_EPS",
]

EMA_EPS = 1e-5  # the default Laplace smoothing of the EMA cluster sizes (docs/design.md §2.3)

# Rows per chunk when the reference forms a [chunk, K] distance block; keeps memory bounded.
_CHUNK_ELEMENTS = 1 << 24


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _no_tf32():
    """The spec is computed without TF32 on any device."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def lookup(
    z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per row (docs/design.md §2.1).

    z [N, D], codebook [K, D] (float32/bfloat16/float16/float64), codebook_sqnorm [K] (optional).
    Returns codes int32 [N] = argmin_k ||e_k||^2 - 2 z.e_k (ties: smallest k; a NaN distance is
    treated as +inf so it never wins) and dist [N] float32 (float64 for float64 inputs)
    = that minimum + ||z||^2, clamped at 0 (NaN stays NaN).
    Batched codebooks (per-head codebooks): z [N, C, D], codebook [C, K, D], codebook_sqnorm [C, K]:
    column c of codes / dist [N, C] is the search of z[:, c] in codebook[c].
    """
    if codebook.dim() == 3:
        found = [lookup(z[:, c], codebook[c], None if codebook_sqnorm is None else codebook_sqnorm[c])
                 for c in range(codebook.shape[0])]
        return torch.stack([f[0] for f in found], -1), torch.stack([f[1] for f in found], -1)
    acc = _accum_dtype(z.dtype)
    e = codebook.to(acc)
    e_sq = (e * e).sum(-1) if codebook_sqnorm is None else codebook_sqnorm.to(acc)
    n = z.shape[0]
    codes = torch.empty(n, dtype=torch.int32, device=z.device)
    dist = torch.empty(n, dtype=acc, device=z.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, codebook.shape[0]))
    with _no_tf32():
        for start in range(0, n, chunk):
            zc = z[start : start + chunk].to(acc)
            scores = e_sq[None, :] - 2.0 * (zc @ e.T)  # [chunk, K]
            scores = torch.where(torch.isnan(scores), torch.full_like(scores, math.inf), scores)
            best, idx = scores.min(dim=1)  # first occurrence of the minimum -> smallest k
            d = best + (zc * zc).sum(-1)
            codes[start : start + chunk] = idx.to(torch.int32)
            dist[start : start + chunk] = torch.where(d < 0, torch.zeros_like(d), d)
    return codes, dist


def quantize(
    z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: Optional[torch.Tensor] = None, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code, its row, the commitment-loss sum and the non-finite rows in one pass (docs/design.md §2.1).

    z [N, D], codebook [K, D] (same dtype: float32/bfloat16/float16/float64), codebook_sqnorm [K] (optional).
    normalize: z is first replaced by its unit rows u = l2norm(z) (in the dtype of z; `l2norm`: cosine
    similarity, vector-quantize-pytorch's use_cosine_sim), and everything below is of u instead of z.
    Returns
      codes int32 [N] and dist [N] float32 (float64 for float64 inputs): exactly `lookup(z, codebook)`;
      quantized [N, D] (dtype of z) = codebook[codes]: the straight-through output's values, bit-exact rows
        of the codebook;
      sqdist_sum [] float32 (float64 for float64 inputs) = sum_i dist[i], accumulated in float64 and
        rounded once: the commitment loss is sqdist_sum / (N D). Non-finite when any row is;
      nonfinite int64 [2] = (number of rows i with a non-finite dist[i], the first such i or -1): every
        row of z holding NaN/Inf is one (so is a finite row whose float32 squared distance overflows).
        A device tensor: reading it is the caller's choice (no host sync here).
    Gradient (docs/design.md §2.1, straight-through + commitment): dL/dz = g_quantized
    + 2 (g_sqdist_sum + g_dist[:, None]) (z - quantized); the codebook gets none (EMA updates it).
    With normalize, that is dL/du, and dL/dz = l2norm's Jacobian (I - u u^T) / max(|z|, 1e-6) applied to it.
    """
    if normalize:
        z = l2norm(z)
    codes, dist = lookup(z, codebook, codebook_sqnorm)
    quantized = codebook[codes.long()].to(z.dtype)
    sqdist_sum = dist.double().sum().to(dist.dtype)
    return codes, quantized, dist, sqdist_sum, nonfinite_report(dist)


def l2norm(z: torch.Tensor) -> torch.Tensor:
    """Unit rows z / max(|z|, 1e-6) along the last dim, in the dtype of z (torch's normalize, with
    vector-quantize-pytorch's l2norm eps)."""
    return torch.nn.functional.normalize(z, dim=-1, eps=1e-6)


def l2norm_backward(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient through `l2norm` (float32; float64 for float64 z): grad [..., D] with respect to
    u = l2norm(z) -> (grad - u (u . grad)) / |z| with respect to z, or grad / 1e-6 where |z| < 1e-6
    (the clamp holds the norm constant there), as autograd differentiates torch's normalize."""
    acc = _accum_dtype(z.dtype)
    z, g = z.to(acc), grad.to(acc)
    n = z.norm(dim=-1, keepdim=True)
    d = n.clamp_min(1e-6)
    u = z / d
    radial = u * (u * g).sum(-1, keepdim=True)
    return (g - torch.where(n >= 1e-6, radial, torch.zeros_like(radial))) / d


def sample_codes(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool = False, block_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-max sampling of one code per row (vector-quantize-pytorch's stochastic_sample_codes,
    its draws and its arithmetic), with the chosen rows and their distances (what a VQ layer does next).
    z [N, D] and codebook [K, D] float32 (any strides), temp > 0.

    Draws u [N, K] from the default generator of z's device as torch's uniform_ does, row-major (in
    blocks of block_rows rows: on the CPU the same numbers as one [N, K] draw), and takes the noise
    g = log(-log(max(u, 1e-20))) (minus a Gumbel sample). Returns codes int64 [N]:
      argmin_k sqrt(max(dist_k, 1e-8)) / temp + g_k (the peer's argmax of -dist / temp + gumbel), dist
      = (|z|^2 + |e_k|^2) - 2 z.e_k accumulated by addmm; cosine: argmax_k z.e_k / temp - g_k.
    Ties: the first index; a NaN wins (torch's argmin / argmax). Consumes N K draws of the generator.
    Also returns quantized [N, D] float32 = codebook[codes] and dist [N] float32 = ||z - quantized||^2
    (summed over D in float32; non-finite where the row of z is).
    Per-head codebooks: z [N, C, D], codebook [C, K, D] -> codes [N, C], quantized [N, C, D], dist
    [N, C]: column c is this sampling of z[:, c] in codebook[c], the codebooks in order (codebook 0's
    N K draws first: the uniforms of [C, N, K] row-major, the peer's order for separate codebooks).
    """
    if codebook.dim() == 3:
        return _per_codebook(lambda c: sample_codes(z[:, c], codebook[c], temp, cosine, block_rows), codebook.shape[0])
    n, k = z.shape[0], codebook.shape[0]
    e = codebook.float()
    et, e_sq = e.T, e.pow(2).sum(-1)
    codes = torch.empty(n, dtype=torch.int64, device=z.device)
    step = max(1, min(block_rows, n))
    logits_buf = torch.empty(step, k, device=z.device)
    noise_buf = torch.empty(step, k, device=z.device)
    with torch.no_grad(), _no_tf32():
        for start in range(0, n, step):
            r = z[start : start + step].float()
            m = r.shape[0]
            logits, noise = logits_buf[:m], noise_buf[:m]
            # The peer's second clamp (of -log(u)) is left out: u < 1, so -log(u) >= 5.9e-8 already.
            noise.uniform_(0, 1).clamp_min_(1e-20).log_().neg_().log_()
            if cosine:
                torch.mm(r, et, out=logits).div_(temp).sub_(noise)
                torch.argmax(logits, -1, out=codes[start : start + m])
            else:
                torch.add(r.pow(2).sum(-1, keepdim=True), e_sq, out=logits).addmm_(r, et, alpha=-2.0)
                logits.clamp_min_(1e-8).sqrt_().div_(temp).add_(noise)
                torch.argmin(logits, -1, out=codes[start : start + m])
        quantized = e[codes]
        dist = (z.float() - quantized).pow(2).sum(-1)
    return codes, quantized, dist


# Philox 4x32-10 as triton.language.random runs it (tl.rand): the round multipliers and the key
# increments (Weyl constants).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a uint32 constant and b uint32 values held in int64
    (the full product needs 64 unsigned bits: computed from b's 16-bit halves, nothing overflows)."""
    hi16, lo16 = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * hi16, a * lo16  # < 2^48 each
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return high, low


def philox_uniform(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's `tl.rand(seed, offsets)` in torch integer ops (triton/language/random.py, Triton 3.x):
    Philox 4x32 with 10 rounds on the counter (offset & 0xffffffff, offset >> 32, 0, 0) and the key
    (seed & 0xffffffff, seed >> 32), its first output word x as int32, then
    float32(x < 0 ? ~x : x) * float32(4.6566127342e-10), uniform in [0, 1).
    seed: int64 [] or [1] (a device tensor: no host sync); offsets: int64 [...] >= 0 (64-bit
    counters, as a kernel's int64 offsets). Returns float32 [...] on offsets' device."""
    seed = seed.reshape(()).to(torch.int64)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1 = offsets & _U32, (offsets >> 32) & _U32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    x = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def sample_codes_philox(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-max sampling with counter-based noise: the spec of the Triton backend of sample_codes,
    whose noise cannot be torch's uniform_ stream (a difference on purpose: the same distribution,
    other numbers than the peer's). z [N, D], codebook [K, D] float32, temp > 0, seed int64 [1].

    u[i, k] = philox_uniform(seed, i K + k) (independent of any tiling; no generator state is read or
    advanced here), g = log(max(-log(max(u, 1e-20)), 1e-20)) (minus a Gumbel sample, the peer's clamps).
    Returns codes int64 [N]: argmin_k score_k with score = sqrt(max(d_k, 1e-8)) / temp + g_k, d_k =
    |z|^2 + (|e_k|^2 - 2 z.e_k) in float32 (the peer's logits -cdist / temp); cosine: score = g_k -
    z.e_k / temp (argmax of z.e / temp + gumbel). A NaN score never wins, ties go to the smallest k (a
    row whose scores are all NaN, e.g. a NaN row of z, takes code 0: a non-finite row's code is
    unspecified). quantized [N, D] float32 = codebook[codes], dist [N] float32 = ||z - quantized||^2
    (non-finite where the row of z is), as sample_codes.
    Per-head codebooks: z [N, C, D], codebook [C, K, D] -> codes [N, C], quantized [N, C, D], dist
    [N, C]: column c is this sampling of z[:, c] in codebook[c] with the counters of the rows c N ..
    c N + N - 1, i.e. u[i, c, k] = philox_uniform(seed, (c N + i) K + k) (the counters of [C, N, K]
    row-major: C single-codebook calls whose counters are offset by c N K).
    """
    if codebook.dim() == 3:
        n = z.shape[0]
        return _per_codebook(lambda c: _philox_rows(z[:, c], codebook[c], temp, cosine, seed, c * n), codebook.shape[0])
    return _philox_rows(z, codebook, temp, cosine, seed, 0)


def _per_codebook(sample, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-head form of a sampler: sample(i) for i = 0 .. c - 1, in order (their draws), each
    (codes [N], quantized [N, D], dist [N]), stacked to [N, C], [N, C, D], [N, C]."""
    found = [sample(i) for i in range(c)]
    return tuple(torch.stack([f[j] for f in found], 1) for j in range(3))


def _philox_rows(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool, seed: torch.Tensor, first_row: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample_codes_philox of z [N, D] over codebook [K, D] with the counters of rows first_row ..
    first_row + N - 1 ((first_row + i) K + k)."""
    n, k = z.shape[0], codebook.shape[0]
    e = codebook.float()
    codes = torch.empty(n, dtype=torch.int64, device=z.device)
    step = max(1, min(n, _CHUNK_ELEMENTS // (8 * max(1, k))))  # the Philox rounds hold several int64 [rows, K]
    with torch.no_grad():
        for start in range(0, n, step):
            scores = philox_scores(z[start : start + step], e, temp, cosine, seed, first_row + start)
            scores = torch.where(torch.isnan(scores), torch.full_like(scores, math.inf), scores)
            codes[start : start + scores.shape[0]] = scores.argmin(-1)
        quantized = e[codes]
        dist = (z.float() - quantized).pow(2).sum(-1)
    return codes, quantized, dist


def philox_scores(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, cosine: bool, seed: torch.Tensor, first_row: int = 0
) -> torch.Tensor:
    """The scores float32 [N, K] whose argmin sample_codes_philox takes, for the rows first_row ..
    first_row + N of its z (z here: those rows [N, D]; codebook [K, D])."""
    n, k = z.shape[0], codebook.shape[0]
    r, e = z.float(), codebook.float()
    rows = torch.arange(first_row, first_row + n, device=z.device)
    u = philox_uniform(seed.to(z.device), rows[:, None] * k + torch.arange(k, device=z.device))
    noise = u.clamp_min(1e-20).log().neg().clamp_min(1e-20).log()
    with _no_tf32():
        dot = r @ e.T
    if cosine:
        return noise - dot / temp
    d = r.pow(2).sum(-1, keepdim=True) + (e.pow(2).sum(-1) - 2.0 * dot)
    return d.clamp_min(1e-8).sqrt() / temp + noise


def nonfinite_report(dist: torch.Tensor) -> torch.Tensor:
    """dist [..., N] -> int64 [..., 2]: (number of non-finite entries along the last dimension, the
    first one's index or -1), computed on the device (no host sync)."""
    n = dist.shape[-1]
    bad = ~torch.isfinite(dist)
    count = bad.sum(-1)
    index = torch.arange(n, device=dist.device).expand(dist.shape)
    first = torch.where(bad, index, n).amin(-1) if n else count
    first = torch.where(count > 0, first, torch.full_like(first, -1))
    return torch.stack([count, first], -1).to(torch.int64)


def hrq_quantize(
    zs: Sequence[torch.Tensor], codebooks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical residual quantization with residual doubling (docs/design.md §2.2).

    zs: L tensors [N, D] (encoder outputs at the tapped blocks, one dtype); codebooks: L tensors
    [K_l, D] of that dtype. H_0 = Z_0; H_l = 2 Z_l - C_{l-1}[M_{l-1}] (rounded to the dtype of zs);
    M_l = lookup(H_l, C_l); Hhat_l = C_l[M_l].
    Returns codes int32 [L, N] and zhat_levels [L, N, D] (dtype of zs), the cumulative means
    zhat_levels[l] = mean_{m<=l} Hhat_m, accumulated in float32 and rounded once.
    Gradient (straight-through, docs/design.md §2.2): Hhat_l carries the gradient of H_l, with the previous
    code embedding inside H_l detached, so d zhat_levels[l] / d Z_0 = 1/(l+1) and / d Z_m = 2/(l+1)
    for 1 <= m <= l. Codebooks get no gradient (they are updated by EMA).
    """
    if len(zs) != len(codebooks) or len(zs) == 0:
        raise ValueError(f"hrq_quantize: got {len(zs)} inputs and {len(codebooks)} codebooks")
    acc = _accum_dtype(zs[0].dtype)
    codes, levels = [], []
    running = None
    prev_embedding = None
    for level, (z, cb) in enumerate(zip(zs, codebooks)):
        h = z if level == 0 else 2.0 * z - prev_embedding
        m, _ = lookup(h.detach(), cb.detach())
        hhat = cb.detach()[m.long()]
        # hhat + (h - sg(h)) with h - sg(h) = slope * (z - sg(z)) (the previous code is detached):
        # the value is exactly hhat, the gradient is h's. Written on z, not h: h may be inf where z
        # is finite (float16: 2 z overflows), and inf - inf would turn the value into NaN.
        slope = 1.0 if level == 0 else 2.0
        hhat_ste = hhat.to(acc) + slope * (z.to(acc) - z.detach().to(acc))
        running = hhat_ste if running is None else running + hhat_ste
        levels.append((running / (level + 1)).to(z.dtype))
        codes.append(m)
        prev_embedding = hhat
    return torch.stack(codes), torch.stack(levels)


def hrq_level_losses(
    zs: Sequence[torch.Tensor], zhat_levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What HRQ's commitment loss and finite check need per level (docs/design.md §2.2), from
    zs (L tensors [N, D]) and hrq_quantize's zhat_levels [L, N, D] (dtype of zs).

    Returns sqdist [L, N] float32 (float64 for float64 inputs) = ||Z_l - zhat_levels[l]||^2 per row
    (differences of the float32 values); sqdist_sum [L] (same dtype) = sum over rows, accumulated in
    float64 and rounded once (the loss is sum_l sqdist_sum[l] / (N D)); nonfinite int64 [L, 2] =
    `nonfinite_report(sqdist)`: every row of Z_l holding NaN/Inf is one (so is a finite row whose
    float32 squared distance overflows). Gradient (the target detached): d sqdist[l, i] / d Z_l[i]
    = 2 (Z_l[i] - zhat_levels[l, i]).
    """
    acc = _accum_dtype(zhat_levels.dtype)
    sqdist = torch.stack([(z.to(acc) - zl.detach().to(acc)).pow(2).sum(-1) for z, zl in zip(zs, zhat_levels)])
    sqdist_sum = sqdist.double().sum(-1).to(acc)
    return sqdist, sqdist_sum, nonfinite_report(sqdist.detach())


def ema_stats(
    x: torch.Tensor,
    codes: torch.Tensor,
    num_codes: int,
    *,
    mask: Optional[torch.Tensor] = None,
    prev_codes: Optional[torch.Tensor] = None,
    prev_codebook: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduction of the EMA update (docs/design.md §2.3): per-code counts [K] and vector sums [K, D].

    x [N, D], codes [N] int in [0, num_codes), mask [N] bool (False rows count for nothing). With
    prev_codes [N] and prev_codebook [K', D], the vector of row i is 2 x_i - prev_codebook[prev_codes_i]
    (HRQ's H_l). Accumulated in float32 (float64 for float64 x), the dtype of both outputs.
    """
    acc = _accum_dtype(x.dtype)
    xf = x.to(acc)
    if prev_codes is not None:
        xf = 2.0 * xf - prev_codebook.to(acc)[prev_codes.long()]
    weight = torch.ones(x.shape[0], dtype=acc, device=x.device) if mask is None else mask.to(acc)
    idx = codes.long()
    counts = torch.zeros(num_codes, dtype=acc, device=x.device).index_add_(0, idx, weight)
    sums = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device).index_add_(0, idx, xf * weight[:, None])
    return counts, sums


def laplace_smoothed(cluster_size: torch.Tensor, eps: float = EMA_EPS) -> torch.Tensor:
    """Laplace-smoothed cluster sizes [K] (docs/design.md §2.3): (n_k + eps) / (sum n + K eps) * sum n, so no
    code divides by zero and the total is kept. [..., K]: each codebook (last dim) on its own."""
    total = cluster_size.sum(-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def ema_update(
    x: torch.Tensor,
    codes: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    *,
    decay: float = 0.99,
    eps: float = EMA_EPS,
    mask: Optional[torch.Tensor] = None,
    all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMA codebook update (docs/design.md §2.3), functional: returns new tensors, inputs untouched.

    x [N, D] (the vectors that were quantised), codes [N] int in [0, K), cluster_size [K] float32,
    embed_sum [K, D] float32, mask [N] bool (False rows are padding and count for nothing).
    all_reduce: called in place on the concatenated float32 [K * (1 + D)] buffer [n | s] (e.g. a
    torch.distributed SUM all_reduce) before the EMA.
    Returns (cluster_size, embed_sum, codebook [K, D] float32).
    """
    k = cluster_size.shape[0]
    acc = _accum_dtype(x.dtype)
    n, s = ema_stats(x, codes, k, mask=mask)
    if all_reduce is not None:
        buf = torch.cat([n, s.reshape(-1)])
        all_reduce(buf)
        n, s = buf[:k], buf[k:].reshape(k, -1)
    new_cluster_size = decay * cluster_size.to(acc) + (1.0 - decay) * n
    new_embed_sum = decay * embed_sum.to(acc) + (1.0 - decay) * s
    codebook = new_embed_sum / laplace_smoothed(new_cluster_size, eps)[:, None]
    return new_cluster_size, new_embed_sum, codebook


@assume_constant_result  # constants for torch.compile: no generator inside a graph
def _kmeans_init_draws(init: str, seed: int, k: int, n: int) -> tuple:
    """The random draws of `kmeans_init`, from a CPU generator seeded with `seed`: "random": k row
    indices; "kmeans++": k uniforms (float64) and the first row's index. Python numbers, not
    tensors: torch.compile bakes them into the graph (a second tensor-valued call in one graph,
    e.g. one per HRQ level, trips dynamo's constant sources)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if init == "random":
        pick = torch.randperm(n, generator=gen)[:k]
        if k > n:
            pick = torch.cat([pick, torch.randint(n, (k - n,), generator=gen)])
        return tuple(pick.tolist())
    uniforms = torch.rand(k, generator=gen, dtype=torch.float64)
    first = torch.randint(n, (1,), generator=gen)
    return (*uniforms.tolist(), *first.tolist())


def kmeans_init(x: torch.Tensor, k: int, *, init: str = "kmeans++", seed: int = 0) -> torch.Tensor:
    """Initial centroids [k, D] (float32; float64 for float64 x) from the rows of x [N, D].

    "kmeans++": D^2 sampling by inverse CDF with uniforms drawn up front from a CPU generator, so it
    runs on x's device without a host round trip per centroid (and traces under torch.compile);
    "random": distinct random rows (repeated when k > N). Deterministic for a seed.
    """
    n, d = x.shape
    if n == 0 or k < 1:
        raise ValueError(f"kmeans: need N >= 1 rows and k >= 1, got N={n}, k={k}")
    if init not in ("random", "kmeans++"):
        raise ValueError(f"kmeans: unknown init {init!r} (expected 'kmeans++' or 'random')")
    acc = _accum_dtype(x.dtype)
    xf = x.to(acc)
    draws = _kmeans_init_draws(init, seed, k, n)
    if init == "random":
        return xf[torch.tensor(draws, dtype=torch.int64, device=x.device)].clone()
    uniforms = torch.tensor(draws[:k], dtype=torch.float64, device=x.device)
    first = torch.tensor(draws[k:], dtype=torch.int64, device=x.device)
    # index_select with 1-element index tensors, not xf[t[0]]: no data-dependent Python index.
    centroids = [xf.index_select(0, first)]
    closest = (xf - centroids[0]).pow(2).sum(-1)
    for j in range(1, k):
        weights = torch.nan_to_num(closest.double().clamp_min(0), nan=0.0, posinf=0.0)
        cdf = weights.cumsum(0)
        choice = torch.searchsorted(cdf, (uniforms[j] * cdf[-1]).reshape(1), right=True).clamp_(max=n - 1)
        centroids.append(xf.index_select(0, choice))
        closest = torch.minimum(closest, (xf - centroids[j]).pow(2).sum(-1))
    return torch.cat(centroids)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    *,
    init: str = "kmeans++",
    seed: int = 0,
) -> torch.Tensor:
    """k-means on x [N, D] (docs/design.md §2.4): `kmeans_init`, then `iters` rounds of assigning with
    `lookup` and updating with the `ema_stats` reduction (plain means). A cluster left
    empty keeps its previous centroid. Returns centroids [k, D] float32 (float64 for float64 x).
    """
    centroids = kmeans_init(x, k, init=init, seed=seed)
    acc = centroids.dtype
    xf = x.to(acc)
    for _ in range(iters):
        codes, _ = lookup(xf, centroids)
        counts, sums = ema_stats(xf, codes, k)
        means = sums / counts.clamp_min(1)[:, None]
        centroids = torch.where((counts > 0)[:, None], means, centroids)
    return centroids


def check_base_ids(ids: torch.Tensor) -> None:
    """Raise ValueError naming ids[b, t] for the first id of ids [B, L] outside 0..5."""
    bad = (ids < 0) | (ids > BASE_PAD_ID)
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"stem: ids[{b}, {t}] = {int(ids[b, t])} is not a base id (0..4) or the pad id 5")


def stem(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    ln_eps: float = 1e-6,
) -> torch.Tensor:
    """The tokenizer stem on base ids as a gather-sum (docs/design.md §2.5), then LayerNorm and GELU.

    ids [B, L] integer in 0..4 (A C G T N) or BASE_PAD_ID (5: no base, contributes nothing);
    weight [D, 5, W] (Conv1d weight over the one-hot input, W odd, padding W // 2), bias [D],
    ln_weight/ln_bias [D]. y[b, t] = bias + sum_j weight[:, ids[b, t + j - W//2], j], positions
    outside [0, L) contribute nothing. Returns [B, L, D] in float32 (float64 for float64 weights):
    GELU(LayerNorm(y)) with the exact (erf) GELU.
    Equals GELU(LayerNorm(Conv1d(one_hot(ids)))) without ever building the one-hot tensor.
    """
    if ids.dim() != 2:
        raise ValueError(f"stem: ids must be [B, L], got shape {tuple(ids.shape)}")
    check_base_ids(ids)
    acc = _accum_dtype(weight.dtype)
    d, c, width = weight.shape
    if c != NUM_BASES or width % 2 == 0:
        raise ValueError(f"stem: weight must be [D, 5, odd width], got {tuple(weight.shape)}")
    half = width // 2
    batch, length = ids.shape
    # A zero column appended at channel 5 makes the pad id (and positions off the edge) add nothing.
    table = torch.cat([weight.to(acc), torch.zeros(d, 1, width, dtype=acc, device=weight.device)], dim=1)
    padded = torch.full((batch, length + 2 * half), BASE_PAD_ID, dtype=torch.long, device=ids.device)
    padded[:, half : half + length] = ids.long()
    y = bias.to(acc).expand(batch, length, d).clone()
    for j in range(width):
        y += table[:, :, j].T[padded[:, j : j + length]]  # gather [B, L, D]
    y = torch.nn.functional.layer_norm(y, (d,), ln_weight.to(acc), ln_bias.to(acc), ln_eps)
    return torch.nn.functional.gelu(y)


def convnext_block(
    x: torch.Tensor,
    keep: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: torch.Tensor,
    *,
    ln_eps: float = 1e-6,
) -> torch.Tensor:
    """One ConvNeXt block of the tokenizer, channels-last (docs/design.md §3):
    keep * (x + gamma * Linear2(GELU(Linear1(LayerNorm(DWConv(x)))))).

    x [B, L, D]; keep [B, L] bool (rows where False are written as zeros) or None (all kept);
    dw_weight [D, 1, k] (depthwise Conv1d, k odd, zero padding k // 2 at the record's ends), dw_bias,
    ln_weight, ln_bias, b2, gamma [D]; w1 [H, D], b1 [H], w2 [D, H] (nn.Linear layout); exact (erf)
    GELU. Computes and returns [B, L, D] in x's dtype (float64 inputs: float64), with exactly the
    torch ops of vqdna.models.convnext.ConvNeXtBlock1d (differentiable)."""
    y = torch.nn.functional.conv1d(x.transpose(1, 2), dw_weight, dw_bias, padding=dw_weight.shape[-1] // 2,
                                   groups=dw_weight.shape[0]).transpose(1, 2)
    y = torch.nn.functional.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, ln_eps)
    y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(y, w1, b1)), w2, b2)
    y = x + gamma * y
    return y if keep is None else y * keep[..., None].to(y.dtype)
