"""quantize: every backend against the spec (reference.quantize, docs/design.md §2.1): lookup's codes and
distances, the chosen rows bit-exact, the float64-accumulated loss sum, the non-finite row report,
and the straight-through + commitment gradient."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, quantize, reference
from vqdna.kernels.ops.registry import backend_op
from tests.conftest import backend_params, require_backend
from tests.kernels.ops.test_lookup import assert_lookup_matches, exact_distances, make_inputs
from tests.tolerances import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ids = lambda t: str(t).split(".")[-1]  # noqa: E731
# (N, K, D): one row, one code, D not a multiple of 16 (nor of the 6-row / 16-code tiles), large K.
SHAPES = [(1, 1, 1), (1, 5, 17), (7, 1, 3), (200, 33, 17), (131, 4096, 40)]


def assert_quantize_matches(z, codebook, out, dtype):
    codes, quantized, dist, sqdist_sum, nonfinite = out
    n = z.shape[0]
    assert_lookup_matches(z, codebook, codes, dist, dtype)
    assert quantized.dtype == z.dtype and quantized.shape == z.shape
    assert torch.equal(quantized.cpu(), codebook.cpu()[codes.cpu().long()]), "quantized must be the chosen rows, bit-exact"
    assert sqdist_sum.shape == () and sqdist_sum.dtype == torch.float32
    # The float64 sum of the returned distances, rounded once (order differs: an ulp of float32 at most).
    want = dist.cpu().double().sum()
    assert abs(float(sqdist_sum) - float(want)) <= 2**-23 * abs(float(want)) + 1e-30
    # ... and of the exact distances within the per-row tolerance.
    if n:
        exact = exact_distances(z, codebook).gather(1, codes.cpu().long()[:, None])[:, 0]
        scale = z.double().cpu().pow(2).sum(-1) + codebook.double().cpu().pow(2).sum(-1).max()
        assert abs(float(sqdist_sum) - float(exact.sum())) <= float((TOL[dtype] * scale + 1e-9).sum())
    assert nonfinite.dtype == torch.int64 and nonfinite.tolist() == [0, -1]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("n,k,d", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend,device", backend_params("quantize"))
def test_quantize_matches_reference(backend, device, n, k, d, dtype, rng, poison):
    require_backend(backend, device, "quantize")
    z, codebook = make_inputs(n, k, d, dtype, device, rng)
    out = quantize(z, codebook, backend=backend)
    assert dispatch.last_backend("quantize") == backend
    assert_quantize_matches(z, codebook, out, dtype)


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_exact_ties_pick_lowest_index(backend, device, dtype, rng, poison):
    """Small integers: every sum is exact, duplicated codes tie exactly and the lowest index wins."""
    require_backend(backend, device, "quantize")
    k, d = 700, 21
    codebook = torch.randint(-3, 4, (100, d), generator=rng).float()[torch.arange(k) % 100]
    codebook = codebook[torch.randperm(k, generator=rng)]
    z = torch.randint(-3, 4, (300, d), generator=rng).float()
    z[:100] = codebook[torch.randint(k, (100,), generator=rng)]
    exact = exact_distances(z, codebook)
    expected = exact.argmin(dim=1)
    codes, quantized, dist, sqdist_sum, _ = quantize(z.to(dtype).to(device), codebook.to(dtype).to(device), backend=backend)
    assert torch.equal(codes.cpu().long(), expected)
    assert torch.equal(quantized.cpu().float(), codebook[expected])
    assert float(sqdist_sum) == float(exact.min(dim=1).values.sum())  # integers: exact in any order


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_nonfinite_rows_are_reported_on_the_device(backend, device, dtype, rng, poison):
    require_backend(backend, device, "quantize")
    n, k, d = 50, 300, 19
    z, codebook = make_inputs(n, k, d, dtype, "cpu", rng)
    for row, col, value in ((3, 5, math.nan), (10, 0, math.inf), (11, 18, -math.inf), (47, 2, math.nan)):
        z[row, col] = value
    codes, quantized, dist, sqdist_sum, nonfinite = quantize(z.to(device), codebook.to(device), backend=backend)
    assert nonfinite.device.type == torch.device(device).type
    assert nonfinite.tolist() == [4, 3]
    assert not math.isfinite(float(sqdist_sum))
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[3, 10, 11, 47]] = True
    assert not bool(torch.isfinite(dist.cpu()[bad]).any())
    codes = codes.cpu().long()
    assert bool(((codes >= 0) & (codes < k)).all())
    assert torch.equal(quantized.cpu(), codebook[codes])  # every row, the bad ones too, is a code
    good = ~bad
    assert_lookup_matches(z[good], codebook, codes[good].to(torch.int32), dist.cpu()[good], dtype)


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_gradient_is_straight_through_plus_commitment(backend, device, dtype, rng, poison):
    require_backend(backend, device, "quantize")
    z, codebook = make_inputs(40, 9, 13, dtype, device, rng)
    z.requires_grad_(True)
    codes, quantized, dist, sqdist_sum, nonfinite = quantize(z.reshape(4, 10, 13), codebook, backend=backend)
    assert quantized.requires_grad and not codes.requires_grad and not nonfinite.requires_grad
    g = torch.randn(quantized.shape, generator=rng).to(device)
    w = torch.rand(dist.shape, generator=rng).to(device)
    ((quantized.float() * g).sum() + 0.7 * sqdist_sum + (dist * w).sum()).backward()
    diff = (z.detach().float() - quantized.detach().float().reshape(40, 13))
    want = g.reshape(40, 13).to(dtype).float() + 2.0 * (0.7 + w.reshape(40, 1)) * diff
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(z.grad.float(), want.to(dtype).float(), rtol=tol, atol=tol)
    assert z.grad.dtype == dtype


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
def test_leading_shape_layout_int64_and_empty(backend, device, rng, poison):
    require_backend(backend, device, "quantize")
    k, d = 37, 24
    z = torch.randn(2, 3, 5, 2 * d, generator=rng)[..., ::2].to(device)  # non-contiguous
    codebook = torch.randn(d, k, generator=rng).T.to(device)
    codes, quantized, dist, sqdist_sum, nonfinite = quantize(z, codebook, backend=backend, codes_dtype=torch.int64)
    assert codes.shape == (2, 3, 5) and codes.dtype == torch.int64 and quantized.shape == z.shape
    flat = quantize(z.reshape(-1, d).contiguous(), codebook.contiguous(), backend=backend)
    assert torch.equal(codes.reshape(-1).to(torch.int32), flat[0])
    assert torch.equal(quantized.reshape(-1, d), flat[1]) and torch.equal(sqdist_sum, flat[3])
    empty = quantize(torch.randn(0, 4, 8, device=device), torch.randn(3, 8, device=device), backend=backend)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 4, 8) and float(empty[3]) == 0.0
    assert empty[4].tolist() == [0, -1]


def test_float64_on_the_reference_only(rng):
    z, e = torch.randn(9, 5, dtype=torch.float64, generator=rng), torch.randn(4, 5, dtype=torch.float64, generator=rng)
    codes, quantized, dist, sqdist_sum, _ = quantize(z, e)
    assert dispatch.last_backend("quantize") == "reference" and sqdist_sum.dtype == torch.float64
    assert torch.equal(quantized, e[torch.cdist(z, e).argmin(1)])
    with pytest.raises(TypeError, match="float64"):
        quantize(z, e, backend="native")


def test_spec_reports_the_first_bad_row():
    z = torch.zeros(6, 2)
    z[4, 1], z[2, 0] = math.inf, math.nan
    assert reference.quantize(z, torch.ones(3, 2))[4].tolist() == [2, 2]


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
def test_opcheck(backend, device, rng):
    require_backend(backend, device, "quantize")
    z, codebook = make_inputs(23, 7, 10, torch.float32, device, rng)
    sq = codebook.pow(2).sum(-1)
    op = backend_op("quantize", backend)
    torch.library.opcheck(op, (z.clone().requires_grad_(True), codebook, sq),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # opcheck's backward harness cannot sum the int32 codes with the float outputs: the compiled-dispatch
    # check runs without grad; the gradient has its own test above.
    torch.library.opcheck(op, (z, codebook, sq), test_utils=("test_aot_dispatch_dynamic",))
