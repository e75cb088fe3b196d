"""lookup with per-head codebooks (codebook [C, K, D], z [..., C, D]): one call for all heads, on every
backend, against the reference and against the same backend's single-codebook lookup of each head."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, lookup, reference
from vqdna.kernels.ops.registry import backend_op
from tests.conftest import backend_params, require_backend
from tests.kernels.ops.test_lookup import DTYPES, assert_lookup_matches, exact_distances, make_inputs

# (N, C, K, D): N = 0 and 1, K = 1, D not a multiple of 16, C = 1; small enough for the Triton interpreter.
SHAPES = [(0, 2, 5, 8), (1, 3, 1, 17), (1, 1, 40, 33), (37, 2, 70, 20), (130, 4, 33, 64), (9, 3, 129, 5)]


def heads_inputs(n, c, k, d, dtype, device, gen):
    """z [n, C, d] and codebooks [C, K, d], every head from make_inputs (rows near its own codes)."""
    pairs = [make_inputs(n, k, d, dtype, "cpu", gen) for _ in range(c)]
    z = torch.stack([p[0] for p in pairs], 1) if n else torch.empty(0, c, d, dtype=dtype)
    return z.to(device), torch.stack([p[1] for p in pairs]).to(device)


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,c,k,d", SHAPES, ids=[f"N{n}-C{c}-K{k}-D{d}" for n, c, k, d in SHAPES])
@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_heads_match_reference_and_single_codebook(backend, device, n, c, k, d, dtype, rng, poison):
    require_backend(backend, device)
    z, books = heads_inputs(n, c, k, d, dtype, device, rng)
    codes, dist = lookup(z, books, backend=backend)
    assert dispatch.last_backend("lookup") == backend
    assert codes.shape == (n, c) and dist.shape == (n, c)
    assert codes.dtype == torch.int32 and dist.dtype == torch.float32
    for h in range(c):
        assert_lookup_matches(z[:, h].cpu(), books[h].cpu(), codes[:, h].cpu(), dist[:, h].cpu(), dtype)
        # The same kernel as the single-codebook lookup of that head: the same codes and bits.
        one_codes, one_dist = lookup(z[:, h].contiguous(), books[h], backend=backend)
        assert torch.equal(codes[:, h].cpu(), one_codes.cpu()), f"head {h}: codes differ from its own lookup"
        assert torch.equal(bits(dist[:, h].cpu()), bits(one_dist.cpu())), f"head {h}: dist differs from its own lookup"


def test_heads_reference_is_per_head_reference(rng):
    """The spec of the batched form is the per-head spec (float64 inputs: the reference's own precision)."""
    z, books = heads_inputs(25, 3, 17, 9, torch.float64, "cpu", rng)
    codes, dist = reference.lookup(z, books)
    for h in range(3):
        want_codes, want_dist = reference.lookup(z[:, h], books[h])
        assert torch.equal(codes[:, h], want_codes) and torch.equal(dist[:, h], want_dist)


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_heads_leading_shape_layout_sqnorm_and_int64(backend, device, rng, poison):
    """z [B, T, C, D] of any layout -> codes [B, T, C] (int64 on request); a given codebook_sqnorm
    [C, K] is the one searched with (code 0 of head 1 made unreachable by its sqnorm)."""
    require_backend(backend, device)
    b, t, c, k, d = 2, 11, 3, 24, 12
    z, books = heads_inputs(b * t, c, k, d, torch.float32, device, rng)
    z = z.view(b, t, c, d)
    z[:, :, 1] = books[1, 0]  # every head-1 row sits on code 0 ...
    sq = books.pow(2).sum(-1)
    sq[1, 0] = 1e30  # ... which its sqnorm rules out
    strided = z.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    codes, dist = lookup(strided, books, codebook_sqnorm=sq, backend=backend, codes_dtype=torch.int64)
    assert codes.shape == (b, t, c) and codes.dtype == torch.int64 and dist.shape == (b, t, c)
    assert not bool((codes[:, :, 1] == 0).any())
    plain, _ = lookup(z, books, backend=backend)
    assert torch.equal(codes[:, :, [0, 2]].cpu(), plain[:, :, [0, 2]].long().cpu())


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_heads_exact_ties_pick_lowest_index(backend, device, dtype, rng, poison):
    """Duplicated codes in different K tiles of every head's codebook (small integers: exact sums)."""
    require_backend(backend, device)
    c, k, d = 2, 300, 19
    base = torch.randint(-3, 4, (c, 60, d), generator=rng).float()
    books = base[:, torch.arange(k) % 60]
    books = torch.stack([books[h, torch.randperm(k, generator=rng)] for h in range(c)])
    z = torch.randint(-3, 4, (80, c, d), generator=rng).float()
    for h in range(c):
        z[:40, h] = books[h, torch.randint(k, (40,), generator=rng)]
    codes, dist = lookup(z.to(dtype).to(device), books.to(dtype).to(device), backend=backend)
    for h in range(c):
        exact = exact_distances(z[:, h], books[h])
        assert torch.equal(codes[:, h].cpu(), exact.argmin(1).to(torch.int32)), f"head {h}"
        assert torch.equal(dist[:, h].cpu().double(), exact.min(1).values), f"head {h}"


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_heads_nonfinite_rows_stay_in_their_head(backend, device, dtype, rng, poison):
    require_backend(backend, device)
    z, books = heads_inputs(30, 3, 40, 18, dtype, "cpu", rng)
    z[3, 1, 5] = math.nan
    z[7, 2] = math.inf
    codes, dist = lookup(z.to(device), books.to(device), backend=backend)
    dist = dist.cpu()
    bad = torch.zeros(30, 3, dtype=torch.bool)
    bad[3, 1] = bad[7, 2] = True
    assert not bool(torch.isfinite(dist[bad]).any())
    assert bool(torch.isfinite(dist[~bad]).all())
    assert bool(((codes >= 0) & (codes < 40)).all())


@pytest.mark.parametrize(
    "z_shape,cb_shape,sq_shape,match",
    [
        ((4, 3, 8), (2, 5, 8), None, r"C=2 codebooks\): z must have shape \[\.\.\., 2, D\], got \(4, 3, 8\)"),
        ((8,), (1, 5, 8), None, r"z must have shape \[\.\.\., 1, D\], got \(8,\)"),
        ((4, 2, 8), (2, 5, 9), None, "dimension mismatch"),
        ((4, 2, 8), (2, 0, 8), None, "empty"),
        ((4, 0, 8), (0, 5, 8), None, r"no codebooks \(C = 0\)"),
        ((4, 2, 8), (2, 5, 8), (10,), r"codebook_sqnorm must have shape \[2, 5\] for codebook \(2, 5, 8\), got \(10,\)"),
        ((4, 2, 8), (2, 5, 8, 1), None, r"\[K, D\] or \[C, K, D\]"),
    ],
)
def test_heads_clear_errors(z_shape, cb_shape, sq_shape, match):
    sq = None if sq_shape is None else torch.ones(sq_shape)
    with pytest.raises(ValueError, match=match):
        lookup(torch.ones(z_shape), torch.ones(cb_shape), codebook_sqnorm=sq)


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_heads_opcheck(backend, device, rng):
    """torch.library's checks of the registered op with batched codebooks (the fake's [N, C] outputs)."""
    require_backend(backend, device)
    op = backend_op("lookup", backend)
    z = torch.randn(33, 3, 20, generator=rng).to(device)
    e = torch.randn(3, 70, 20, generator=rng).to(device)
    sq = e.pow(2).sum(-1)
    tests = ("test_schema", "test_faketensor")
    if not (backend == "triton" and device == "cpu"):
        tests = tests + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, (z, e, sq), test_utils=tests)


def test_native_heads_checks_its_inputs():
    """The native op itself refuses mismatched head shapes with a message naming them."""
    require_backend("native", "cpu")
    op = backend_op("lookup", "native")
    e = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"z has C=3 heads, codebook has C=2"):
        op(torch.randn(4, 3, 8), e, e.pow(2).sum(-1))
    with pytest.raises(RuntimeError, match=r"codebook_sqnorm must have shape \[2, 5\]"):
        op(torch.randn(4, 2, 8), e, torch.ones(10))
    with pytest.raises(RuntimeError, match=r"z must be 3-D \[N, C, D\]"):
        op(torch.randn(4, 8), e, e.pow(2).sum(-1))


def test_heads_reach_the_op_without_a_copy(monkeypatch, rng):
    """A contiguous z [B, T, C, D] reaches the op as a [B * T, C, D] view of its own storage (each
    head's strided rows are read in place: no per-head or transposing copy)."""
    import vqdna.kernels.ops.lookup.wrapper as wrapper

    seen = []
    real = wrapper.backend_op

    def recording(op, name):
        fn = real(op, name)

        def call(z, *rest):
            seen.append((z.data_ptr(), tuple(z.shape)))
            return fn(z, *rest)

        return call

    monkeypatch.setattr(wrapper, "backend_op", recording)
    z = torch.randn(2, 9, 3, 8, generator=rng)
    lookup(z, torch.randn(3, 5, 8, generator=rng), backend="reference")
    assert seen == [(z.data_ptr(), (18, 3, 8))]
