"""vqdna.kernels.lookup: validation, chunking and one dispatch per call (docs/design.md §2.1)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import FLOAT_DTYPES, backend_op

__all__ = ["lookup", "raise_on_nonfinite", "check_lookup_inputs", "codebook_operands"]

# Rows per kernel launch: bounds the temporary memory of a launch and keeps 32-bit row indices safe.
_MAX_ROWS_PER_LAUNCH = 1 << 24


def check_lookup_inputs(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codebook_sqnorm: Optional[torch.Tensor],
    op: str = "lookup",
    codes_dtype: torch.dtype = torch.int32,
    batched: bool = False,
) -> None:
    """The input contract of the single-codebook searches (lookup, quantize); `op` names the public
    function that was called in the errors. batched: also accept per-head codebooks [C, K, D] with
    z [..., C, D] and codebook_sqnorm [C, K] (lookup)."""
    if batched and isinstance(codebook, torch.Tensor) and codebook.dim() == 3:
        c, k, d = codebook.shape
        if c == 0:
            raise ValueError(f"{op}: codebook has shape {tuple(codebook.shape)}: no codebooks (C = 0)")
        if not isinstance(z, torch.Tensor) or z.dim() < 2 or z.shape[-2] != c:
            raise ValueError(f"{op}: codebook has shape {tuple(codebook.shape)} (C={c} codebooks): z must have shape "
                             f"[..., {c}, D], got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if codebook_sqnorm is not None and codebook_sqnorm.shape != (c, k):
            raise ValueError(f"{op}: codebook_sqnorm must have shape [{c}, {k}] for codebook {tuple(codebook.shape)}, "
                             f"got {tuple(codebook_sqnorm.shape)}")
        # The rest of the contract is the one of each codebook [K, D] and its rows.
        check_lookup_inputs(z, codebook[0], None if codebook_sqnorm is None else codebook_sqnorm[0], op, codes_dtype)
        return
    if codes_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: codes_dtype must be torch.int32 or torch.int64, got {codes_dtype}")
    if not isinstance(z, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError(f"{op}: z and codebook must be tensors")
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have shape [..., D], got a {z.dim()}-d tensor")
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must have shape [K, D]{' or [C, K, D]' if batched else ''}, got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: the codebook is empty (K = 0)")
    if codebook.shape[1] != z.shape[-1]:
        raise ValueError(f"{op}: dimension mismatch: z has D={z.shape[-1]}, codebook has D={codebook.shape[1]}")
    if z.shape[-1] == 0:
        raise ValueError(f"{op}: D must be >= 1")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: z has dtype {z.dtype}; expected float32, bfloat16, float16 (or float64 on the reference)")
    if codebook.dtype != z.dtype:
        raise TypeError(f"{op}: dtype mismatch: z is {z.dtype}, codebook is {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"{op}: device mismatch: z is on {z.device}, codebook on {codebook.device}")
    if codebook_sqnorm is not None:
        if codebook_sqnorm.shape != (codebook.shape[0],):
            raise ValueError(f"{op}: codebook_sqnorm must have shape [{codebook.shape[0]}], got {tuple(codebook_sqnorm.shape)}")
        if codebook_sqnorm.device != z.device:
            raise ValueError(f"{op}: device mismatch: codebook_sqnorm is on {codebook_sqnorm.device}, z on {z.device}")


def lookup(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    codebook_sqnorm: Optional[torch.Tensor] = None,
    backend: str = "auto",
    codes_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every vector (docs/design.md §2.1); not differentiable.

    z [..., D] and codebook [K, D]: same dtype (float32, bfloat16, float16; float64 on the reference
    backend only) and device; any layout (the native backend reads a channel-first z, e.g.
    [B, D, N].movedim(1, -1), in place: no transposing copy). codebook_sqnorm [K] (optional,
    float32): ||e_k||^2, reused across calls when the codebook is unchanged.
    Per-head codebooks: codebook [C, K, D] with z [..., C, D] (codebook_sqnorm [C, K]): head c of every
    row is searched in codebook c, all heads in one kernel call (z read in place when its rows are
    contiguous); codes and dist are then [..., C].
    Returns codes [...] (int32, or int64 with codes_dtype=torch.int64): argmin_k ||z - e_k||^2, ties to
    the smallest k; dist [...] float32 (float64 for float64 inputs): the squared distance to the chosen code, clamped at 0,
    non-finite where the row of z is non-finite (its code is then unspecified).
    backend: "auto" | "cuda" | "triton" | "native" | "reference" (env VQDNA_BACKEND replaces "auto").
    """
    check_lookup_inputs(z, codebook, codebook_sqnorm, codes_dtype=codes_dtype, batched=True)
    if codebook.dim() == 3:
        return _lookup_heads(z, codebook, codebook_sqnorm, backend, codes_dtype)
    lead, d = z.shape[:-1], z.shape[-1]
    n = math.prod(lead)
    name = select_backend("lookup", backend, z.device, z.dtype, size=(n, codebook.shape[0]))
    # The native kernel reads a transposed z in place: channel-first input ([B, D, ...] moved to
    # [B, ..., D]) as one [N, D] view, or one per batch row when the rows do not flatten to a view.
    pieces = _transposed_views(z.detach(), d) if name == "native" and n > 0 else None
    if pieces is None:
        pieces = [z.detach().reshape(-1, d).contiguous()]
    cb, sq = codebook_operands(codebook, codebook_sqnorm)
    codes, dist = _launch(backend_op("lookup", name), pieces, cb, sq)
    return codes.to(codes_dtype).reshape(lead), dist.reshape(lead)


def _launch(op, pieces: list, cb: torch.Tensor, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on every piece of z ([n, D] or [n, C, D]), at most _MAX_ROWS_PER_LAUNCH rows per call;
    the results concatenated along the rows."""
    if len(pieces) == 1 and pieces[0].shape[0] <= _MAX_ROWS_PER_LAUNCH:
        return op(pieces[0], cb, sq)
    parts = [op(p[s : s + _MAX_ROWS_PER_LAUNCH], cb, sq) for p in pieces for s in range(0, p.shape[0], _MAX_ROWS_PER_LAUNCH)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _lookup_heads(z, codebook, codebook_sqnorm, backend, codes_dtype):
    """lookup with codebooks [C, K, D] and z [..., C, D]: one op call per _MAX_ROWS_PER_LAUNCH rows
    (of C heads each) on z as [N, C, D] (a view when z's rows are contiguous)."""
    c, k, d = codebook.shape
    lead = z.shape[:-1]
    n = math.prod(lead[:-1])
    name = select_backend("lookup", backend, z.device, z.dtype, size=(n * c, k))
    rows = z.detach().reshape(n, c, d).contiguous()
    codes, dist = _launch(backend_op("lookup", name), [rows], *codebook_operands(codebook, codebook_sqnorm))
    return codes.to(codes_dtype).reshape(lead), dist.reshape(lead)


def codebook_operands(codebook: torch.Tensor, codebook_sqnorm: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The search kernels' codebook operands: the codebook detached and contiguous [K, D] ([C, K, D]),
    and ||e_k||^2 [K] ([C, K]) (the given one, else computed) in float32 (float64 for a float64 codebook)."""
    cb = codebook.detach().contiguous()
    acc = torch.float64 if cb.dtype == torch.float64 else torch.float32
    if codebook_sqnorm is None:
        return cb, cb.to(acc).pow(2).sum(-1)
    return cb, codebook_sqnorm.detach().to(acc).contiguous()


def _transposed_views(z: torch.Tensor, d: int) -> Optional[list]:
    """z [..., D] as column-major [n, D] views (stride(0) == 1), without a copy: one for the whole of
    z, else one per index of its first dim; None when z is not laid out so (D = 1, rows contiguous)."""
    if d == 1 or z.dim() < 2 or z.stride(-2) != 1 or z.is_contiguous():
        return None
    for shape in ((-1, d), (z.shape[0], -1, d)):
        try:
            view = z.view(shape)
        except RuntimeError:  # the leading dims do not merge into one stride
            continue
        views = [view] if view.dim() == 2 else list(view.unbind(0))
        if all(v.stride(0) == 1 for v in views):
            return views
    return None


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
