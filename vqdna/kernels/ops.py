"""Public functional API of the kernels: validation, chunking, and one dispatch per call.

Each op runs on one backend chosen by `vqdna.kernels.dispatch.select_backend`; every backend is a
registered torch.library op (`vqdna::<op>_<backend>`), so torch.compile sees a single op whichever
backend runs.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from vqdna.kernels import native as _native  # noqa: F401  (fake impls of the compiled ops)
from vqdna.kernels import cuda_launch, reference
from vqdna.kernels.dispatch import _TRITON_MODULES, select_backend

__all__ = ["lookup", "hrq_quantize", "ema_stats", "ema_update", "kmeans", "raise_on_nonfinite", "stem"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Rows per kernel launch: bounds the temporary memory of a launch and keeps 32-bit row indices safe.
_MAX_ROWS_PER_LAUNCH = 1 << 24


@torch.library.custom_op("vqdna::lookup_reference", mutates_args=())
def _lookup_reference(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 dist, or float64 when the inputs are float64 (only the spec computes in float64).
    return reference.lookup(z, codebook, codebook_sqnorm)


@_lookup_reference.register_fake
def _(z, codebook, codebook_sqnorm):
    n = z.shape[0]
    dist_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(n, dtype=torch.int32), z.new_empty(n, dtype=dist_dtype)


def _backend_op(op: str, backend: str):
    """The registered op `vqdna::<op>_<backend>`: reference ops live here, native/CUDA ones in
    vqdna._C, Triton ones in vqdna/kernels/triton/."""
    if backend == "reference":
        return _REFERENCE_OPS[op]
    if backend in ("native", "cuda"):
        return getattr(torch.ops.vqdna, f"{op}_{backend}")
    if backend == "triton":
        return getattr(importlib.import_module(_TRITON_MODULES[op]), f"{op}_triton")
    raise AssertionError(backend)


def _lookup_op(backend: str):
    return _backend_op("lookup", backend)


def _check_lookup_inputs(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: Optional[torch.Tensor]) -> None:
    if not isinstance(z, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError("lookup: z and codebook must be tensors")
    if z.dim() < 1:
        raise ValueError(f"lookup: z must have shape [..., D], got a {z.dim()}-d tensor")
    if codebook.dim() != 2:
        raise ValueError(f"lookup: codebook must have shape [K, D], got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("lookup: the codebook is empty (K = 0)")
    if codebook.shape[1] != z.shape[-1]:
        raise ValueError(f"lookup: dimension mismatch: z has D={z.shape[-1]}, codebook has D={codebook.shape[1]}")
    if z.shape[-1] == 0:
        raise ValueError("lookup: D must be >= 1")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lookup: z has dtype {z.dtype}; expected float32, bfloat16, float16 (or float64 on the reference)")
    if codebook.dtype != z.dtype:
        raise TypeError(f"lookup: dtype mismatch: z is {z.dtype}, codebook is {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"lookup: device mismatch: z is on {z.device}, codebook on {codebook.device}")
    if codebook_sqnorm is not None:
        if codebook_sqnorm.shape != (codebook.shape[0],):
            raise ValueError(f"lookup: codebook_sqnorm must have shape [{codebook.shape[0]}], got {tuple(codebook_sqnorm.shape)}")
        if codebook_sqnorm.device != z.device:
            raise ValueError(f"lookup: device mismatch: codebook_sqnorm is on {codebook_sqnorm.device}, z on {z.device}")


def lookup(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    codebook_sqnorm: Optional[torch.Tensor] = None,
    backend: str = "auto",
    codes_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every vector (DESIGN 2.1); not differentiable.

    z [..., D] and codebook [K, D]: same dtype (float32, bfloat16, float16; float64 on the reference
    backend only) and device; any layout. codebook_sqnorm [K] (optional, float32): ||e_k||^2, reused
    across calls when the codebook is unchanged.
    Returns codes [...] (int32, or int64 with codes_dtype=torch.int64): argmin_k ||z - e_k||^2, ties to
    the smallest k; dist [...] float32 (float64 for float64 inputs): the squared distance to the chosen code, clamped at 0,
    non-finite where the row of z is non-finite (its code is then unspecified).
    backend: "auto" | "cuda" | "triton" | "native" | "reference" (env VQDNA_BACKEND replaces "auto").
    """
    _check_lookup_inputs(z, codebook, codebook_sqnorm)
    if codes_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lookup: codes_dtype must be torch.int32 or torch.int64, got {codes_dtype}")
    lead, d = z.shape[:-1], z.shape[-1]
    flat = z.detach().reshape(-1, d).contiguous()
    n = flat.shape[0]
    name = select_backend("lookup", backend, z.device, z.dtype, size=(n, codebook.shape[0]))
    cb = codebook.detach().contiguous()
    if codebook_sqnorm is None:
        acc = torch.float64 if cb.dtype == torch.float64 else torch.float32
        sq = cb.to(acc).pow(2).sum(-1).to(torch.float32 if acc == torch.float32 else acc)
    else:
        sq = codebook_sqnorm.detach().to(torch.float64 if cb.dtype == torch.float64 else torch.float32).contiguous()
    op = _lookup_op(name)
    if n <= _MAX_ROWS_PER_LAUNCH:
        codes, dist = op(flat, cb, sq)
    else:
        parts = [op(flat[s : s + _MAX_ROWS_PER_LAUNCH], cb, sq) for s in range(0, n, _MAX_ROWS_PER_LAUNCH)]
        codes = torch.cat([p[0] for p in parts])
        dist = torch.cat([p[1] for p in parts])
    return codes.to(codes_dtype).reshape(lead), dist.reshape(lead)


def raise_on_nonfinite(dist: torch.Tensor, tensor_name: str = "input") -> None:
    """Raise ValueError naming the first row whose lookup distance is non-finite (a NaN/Inf row).

    dist: the `dist` output of `lookup` ([...]); rows are reported as multi-indices into it.
    """
    bad = ~torch.isfinite(dist)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        count = int(bad.sum())
        raise ValueError(
            f"{tensor_name}: row {tuple(first) if len(first) != 1 else first[0]} holds NaN or Inf "
            f"({count} non-finite row{'s' if count != 1 else ''} in all); pass check_finite=False to skip this check"
        )


# ---------------------------------------------------------------------------------------------
# hrq_quantize (DESIGN 2.2)


@torch.library.custom_op("vqdna::hrq_quantize_reference", mutates_args=())
def _hrq_quantize_reference(
    zs: list[torch.Tensor], codebooks: torch.Tensor, codebook_sqnorms: torch.Tensor, codebook_sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference.hrq_quantize(list(zs), list(codebooks.split(codebook_sizes)))


@_hrq_quantize_reference.register_fake
def _(zs, codebooks, codebook_sqnorms, codebook_sizes):
    n, d = zs[0].shape
    return zs[0].new_empty(len(zs), n, dtype=torch.int32), zs[0].new_empty(len(zs), n, d)


def _hrq_setup_context(ctx, inputs, output):
    ctx.zs_dtype = inputs[0][0].dtype
    ctx.mark_non_differentiable(output[0])  # codes


def _hrq_backward(ctx, grad_codes, grad_levels):
    """Straight-through gradient of DESIGN 2.2: zhat_levels[l] = mean_{m<=l} Hhat_m with
    dHhat_m/dZ_0 = 1 (m = 0) and dHhat_m/dZ_m = 2 (m >= 1), so
    dL/dZ_m = c_m * sum_{l>=m} grad_levels[l] / (l + 1), c_0 = 1, c_m = 2."""
    if grad_levels is None:
        return None, None, None, None
    n_levels = grad_levels.shape[0]
    scale = 1.0 / torch.arange(1, n_levels + 1, device=grad_levels.device, dtype=torch.float32)
    per_level = grad_levels.float() * scale.view(-1, *([1] * (grad_levels.dim() - 1)))
    suffix = per_level.flip(0).cumsum(0).flip(0)
    factor = torch.full((n_levels,), 2.0, device=grad_levels.device)
    factor[0] = 1.0
    grad_zs = (suffix * factor.view(-1, *([1] * (grad_levels.dim() - 1)))).to(ctx.zs_dtype)
    return list(grad_zs.unbind(0)), None, None, None


_autograd_registered: set[tuple[str, str]] = set()


def _op_with_autograd(op: str, backend: str):
    """The backend op of `op` with its gradient formula registered. Reference, native and CUDA
    ops get theirs at import (end of this file): registering while torch.compile traces a call is
    not allowed. Triton ops register on first use, since importing Triton at import is costly."""
    fn = _backend_op(op, backend)
    if (op, backend) not in _autograd_registered:
        _register_autograd(op, backend)
    return fn


def _register_autograd(op: str, backend: str) -> None:
    backward, setup_context = _AUTOGRAD[op]
    torch.library.register_autograd(f"vqdna::{op}_{backend}", backward, setup_context=setup_context)
    _autograd_registered.add((op, backend))


def hrq_quantize(
    zs,
    codebooks,
    *,
    codebook_sqnorms=None,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical residual quantization with residual doubling, all levels fused (DESIGN 2.2).

    zs: L tensors [..., D] (or one tensor [L, ..., D]), one dtype (float32/bfloat16/float16) and device.
    codebooks: L tensors [K_l, D] of that dtype. codebook_sqnorms: optional L tensors [K_l] float32.
    Returns codes int32 [L, ...] (level-local code indices) and zhat_levels [L, ..., D] (dtype of zs),
    zhat_levels[l] the cumulative mean of the chosen code embeddings of levels 0..l (the decoder input
    is zhat_levels[-1]). Differentiable w.r.t. zs with the straight-through gradient of DESIGN 2.2
    (d zhat_levels[-1] / d Z_0 = 1/L, / d Z_l = 2/L); codebooks get no gradient.

    out: optional (codes, zhat_levels) to write into and return, contiguous, of the shapes and dtypes
    above (no autograd). The native backend writes them in place: reused across calls, they spare the
    cost of a fresh output (page faults and the OS zero-filling every new page, about as much as the
    writes themselves for outputs above glibc's 32 MB mmap threshold). Other backends compute as usual
    and copy the result in.
    """
    if isinstance(zs, torch.Tensor):
        zs = list(zs.unbind(0))
    zs, codebooks = list(zs), list(codebooks)
    if len(zs) == 0 or len(zs) != len(codebooks):
        raise ValueError(f"hrq_quantize: need L >= 1 inputs and as many codebooks, got {len(zs)} and {len(codebooks)}")
    lead, d = zs[0].shape[:-1], zs[0].shape[-1]
    for level, (z, cb) in enumerate(zip(zs, codebooks)):
        if z.shape != zs[0].shape:
            raise ValueError(f"hrq_quantize: zs[{level}] has shape {tuple(z.shape)}, zs[0] has {tuple(zs[0].shape)}")
        _check_lookup_inputs(z, cb, None if codebook_sqnorms is None else codebook_sqnorms[level])
        if z.dtype != zs[0].dtype or z.device != zs[0].device:
            raise TypeError(f"hrq_quantize: zs[{level}] is {z.dtype} on {z.device}, zs[0] is {zs[0].dtype} on {zs[0].device}")
    name = select_backend(
        "hrq_quantize", backend, zs[0].device, zs[0].dtype, size=(zs[0].numel() // max(d, 1), sum(cb.shape[0] for cb in codebooks))
    )
    flat = [z.reshape(-1, d).contiguous() for z in zs]
    sizes = [int(cb.shape[0]) for cb in codebooks]
    packed = torch.cat([cb.detach() for cb in codebooks]).contiguous()
    acc = torch.float64 if packed.dtype == torch.float64 else torch.float32
    if codebook_sqnorms is None:
        sq = packed.to(acc).pow(2).sum(-1)
    else:
        sq = torch.cat([s.detach().to(acc) for s in codebook_sqnorms]).contiguous()
    if out is not None:
        return _hrq_quantize_out(name, zs, flat, packed, sq, sizes, out)
    codes, levels = _op_with_autograd("hrq_quantize", name)(flat, packed, sq, sizes)
    return codes.reshape(len(zs), *lead), levels.reshape(len(zs), *lead, d)


def _hrq_quantize_out(name, zs, flat, packed, sq, sizes, out):
    """hrq_quantize into caller-owned (codes, zhat_levels); see hrq_quantize."""
    codes_out, levels_out = out
    shape = (len(zs), *zs[0].shape[:-1])
    for label, t, want_shape, want_dtype in (("codes", codes_out, shape, torch.int32),
                                             ("zhat_levels", levels_out, (*shape, zs[0].shape[-1]), zs[0].dtype)):
        if tuple(t.shape) != want_shape or t.dtype != want_dtype or t.device != zs[0].device or not t.is_contiguous():
            raise ValueError(f"hrq_quantize: out {label} must be a contiguous {want_dtype} tensor of shape "
                             f"{want_shape} on {zs[0].device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             + ("" if t.is_contiguous() else " (not contiguous)"))
    if torch.is_grad_enabled() and any(z.requires_grad for z in zs):
        raise RuntimeError("hrq_quantize(out=...) does not support autograd: call it under torch.no_grad() "
                           "or without out=")
    n, d = flat[0].shape
    if name == "native":
        torch.ops.vqdna.hrq_quantize_native_out(flat, packed, sq, sizes, codes_out.view(len(zs), n),
                                                levels_out.view(len(zs), n, d))
    else:
        codes, levels = _op_with_autograd("hrq_quantize", name)(flat, packed, sq, sizes)
        codes_out.view(len(zs), n).copy_(codes)
        levels_out.view(len(zs), n, d).copy_(levels)
    return codes_out, levels_out


# ---------------------------------------------------------------------------------------------
# ema_update (DESIGN 2.3)


@torch.library.custom_op("vqdna::ema_stats_reference", mutates_args=())
def _ema_stats_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    mask: Optional[torch.Tensor],
    prev_codes: Optional[torch.Tensor],
    prev_codebook: Optional[torch.Tensor],
    num_codes: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    vectors = x.to(acc)
    if prev_codes is not None:
        vectors = 2.0 * vectors - prev_codebook.to(acc)[prev_codes.long()]
    zeros_n = torch.zeros(num_codes, dtype=acc, device=x.device)
    zeros_s = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device)
    counts, sums, _ = reference.ema_update(vectors, codes, zeros_n, zeros_s, decay=0.0, eps=0.0, mask=mask)
    return counts, sums


@_ema_stats_reference.register_fake
def _(x, codes, mask, prev_codes, prev_codebook, num_codes, deterministic):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(num_codes, dtype=acc), x.new_empty(num_codes, x.shape[1], dtype=acc)


def _ema_stats_op(backend: str):
    return _backend_op("ema_stats", backend)


_REFERENCE_OPS = {
    "lookup": _lookup_reference,
    "hrq_quantize": _hrq_quantize_reference,
    "ema_stats": _ema_stats_reference,
}


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
    return _ema_stats_op(name)(flat_x, flat_codes, flat_mask, prev_codes, prev_codebook, int(num_codes), bool(deterministic))


def ema_update(
    x: torch.Tensor,
    codes: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    prev_codes: Optional[torch.Tensor] = None,
    prev_codebook: Optional[torch.Tensor] = None,
    process_group=None,
    sync: bool = False,
    deterministic: Optional[bool] = None,
    backend: str = "auto",
) -> None:
    """EMA codebook update in place (DESIGN 2.3).

    x [..., D] the quantised vectors (or Z_l with prev_codes/prev_codebook: see `ema_stats`),
    codes [...] their codes; state: cluster_size [K] float32, embed_sum [K, D] float32, and the
    codebook [K, D] (any float dtype) rewritten as embed_sum / Laplace-smoothed cluster_size.
    sync: all_reduce (SUM) the fused [counts | sums] buffer over process_group first, so every rank
    applies the same update.
    """
    k = cluster_size.shape[0]
    counts, sums = ema_stats(
        x, codes, k, mask=mask, prev_codes=prev_codes, prev_codebook=prev_codebook,
        deterministic=deterministic, backend=backend,
    )
    if sync:
        import torch.distributed as dist

        buf = torch.cat([counts, sums.reshape(-1)])
        dist.all_reduce(buf, group=process_group)
        counts, sums = buf[:k], buf[k:].reshape(k, -1)
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums.to(embed_sum.dtype), alpha=1.0 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    codebook.copy_(embed_sum / smoothed[:, None])


# ---------------------------------------------------------------------------------------------
# kmeans (DESIGN 2.4)


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


# ---------------------------------------------------------------------------------------------
# stem (DESIGN 2.5)

_ID_DTYPES = (torch.uint8, torch.int32, torch.int64)  # what the backends read; other ints widen to int64
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("vqdna::stem_reference", mutates_args=())
def _stem_reference(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return reference.stem(ids, weight, bias, ln_weight, ln_bias, ln_eps=ln_eps).to(out_dtype)


@_stem_reference.register_fake
def _(ids, weight, bias, ln_weight, ln_bias, ln_eps, out_dtype):
    return weight.new_empty(ids.shape[0], ids.shape[1], weight.shape[0], dtype=out_dtype)


_REFERENCE_OPS["stem"] = _stem_reference


def _stem_recompute(ids, weight, bias, ln_weight, ln_bias, ln_eps):
    """The stem in differentiable torch ops (the backward recomputes through it): F.embedding per
    tap, whose backward is a scatter-add, so no one-hot tensor here either. No data-dependent checks,
    so AOTAutograd can trace it; ids were validated by the forward (an invalid id made that forward
    raise or write NaN; here it is read as pad)."""
    d, _, width = weight.shape
    half = width // 2
    batch, length = ids.shape
    ids = ids.long()
    ids = torch.where((ids >= 0) & (ids <= reference.BASE_PAD_ID), ids, reference.BASE_PAD_ID)
    padded = torch.nn.functional.pad(ids, (half, half), value=reference.BASE_PAD_ID)
    table = torch.cat([weight, weight.new_zeros(d, 1, width)], dim=1)  # channel 5 (pad) adds 0
    y = bias.expand(batch, length, d)
    for j in range(width):
        y = y + torch.nn.functional.embedding(padded[:, j : j + length], table[:, :, j].T)
    y = torch.nn.functional.layer_norm(y, (d,), ln_weight, ln_bias, ln_eps)
    return torch.nn.functional.gelu(y)


def _stem_setup_context(ctx, inputs, output):
    ids, weight, bias, ln_weight, ln_bias, ln_eps, _ = inputs
    ctx.save_for_backward(ids, weight, bias, ln_weight, ln_bias)
    ctx.ln_eps = ln_eps


def _stem_backward(ctx, grad):
    """Gradients of weight, bias, ln_weight, ln_bias by recomputing the forward in torch ops (the
    fast forward is what matters; training pays one extra stem pass)."""
    ids, *params = ctx.saved_tensors
    needs = ctx.needs_input_grad[1:5]
    grads = [None] * 4
    if grad is not None and any(needs):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs)]
            out = _stem_recompute(ids, *leaves, ctx.ln_eps)
            wanted = [i for i, n in enumerate(needs) if n]
            for i, g in zip(wanted, torch.autograd.grad(out, [leaves[i] for i in wanted], grad.to(out.dtype))):
                grads[i] = g
    return (None, *grads, None, None)




def _select_stem_backend(backend: str, device: torch.device, d: int, width: int, out_dtype: torch.dtype,
                         dtype: torch.dtype) -> str:
    """select_backend for a stem with weight [d, 5, width]: the CUDA kernel stages the weight table in
    shared memory and keeps a position's D features in registers, so it cannot run every shape;
    "auto" then takes the next backend and backend="cuda" raises with the reason."""

    def why_not(b: str) -> Optional[str]:
        if b != "cuda":
            return None
        return cuda_launch.stem_cuda_unsupported(d, width, out_dtype, cuda_launch.device_smem_optin(device))

    return select_backend("stem", backend, device, dtype, why_not=why_not)


def stem(
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    ln_eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """The tokenizer stem fused (DESIGN 2.5): GELU(LayerNorm(Conv1d(one_hot(ids)))) as a gather-sum,
    never building the one-hot tensor or (on the fast backends) the pre-activation.

    ids [B, L] integer (uint8 preferred): 0..4 = A C G T N, 5 = pad (adds nothing, like Conv1d's zero
    padding), any layout. weight [D, 5, W] (the Conv1d weight, W odd, padding W // 2), bias,
    ln_weight, ln_bias [D]: float32 / bfloat16 / float16 (float64 on the reference backend only), one
    device. Accumulates in float32; returns [B, L, D] in out_dtype (default float32, float64 for
    float64 weights; bfloat16 / float16 on request).
    Differentiable w.r.t. weight, bias, ln_weight, ln_bias (backward recomputes in torch ops).
    An id outside 0..5 raises ValueError naming ids[b, t]; check_ids=False skips the wrapper's check
    on the Triton / CUDA backends (one host sync), which then write NaN around such an id (the native
    kernel and the reference always check). backend: "auto" | "cuda" | "triton" | "native" | "reference".
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"stem: ids must be a [B, L] tensor, got {tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"stem: ids must be an integer tensor, got {ids.dtype}")
    if weight.dim() != 3 or weight.shape[1] != reference.NUM_BASES or weight.shape[2] % 2 == 0 or weight.shape[0] == 0:
        raise ValueError(f"stem: weight must be [D >= 1, 5, odd width], got {tuple(weight.shape)}")
    d = weight.shape[0]
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (d,):
            raise ValueError(f"stem: {name} must be [D] = [{d}] (D from weight), got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"stem: {name} has dtype {t.dtype}; expected float32, bfloat16, float16 (or float64)")
        if t.device != ids.device:
            raise ValueError(f"stem: device mismatch: {name} is on {t.device}, ids on {ids.device}")
    wide = torch.float64 in (weight.dtype, bias.dtype, ln_weight.dtype, ln_bias.dtype)
    if out_dtype is None:
        out_dtype = torch.float64 if wide else torch.float32
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"stem: out_dtype must be float32, bfloat16 or float16 (or float64), got {out_dtype}")
    name = _select_stem_backend(backend, ids.device, d, weight.shape[2], out_dtype,
                                torch.float64 if wide or out_dtype == torch.float64 else out_dtype)
    if ids.dtype not in _ID_DTYPES:
        ids = ids.to(torch.int64)
    ids = ids.contiguous()
    params = (weight, bias, ln_weight, ln_bias)
    if name != "reference":
        params = tuple(p.float().contiguous() for p in params)  # differentiable casts: gradients flow back
        if name != "native" and check_ids and not torch.compiler.is_compiling():
            reference.check_base_ids(ids)
    return _op_with_autograd("stem", name)(ids, *params, float(ln_eps), out_dtype)


_AUTOGRAD = {
    "hrq_quantize": (_hrq_backward, _hrq_setup_context),
    "stem": (_stem_backward, _stem_setup_context),
}


def _register_compiled_autograd() -> None:
    from vqdna.kernels.native import has_kernel

    for op in _AUTOGRAD:
        for backend in ("reference", "native", "cuda"):
            if backend == "reference" or has_kernel(op, backend):
                _register_autograd(op, backend)


_register_compiled_autograd()
