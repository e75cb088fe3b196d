"""quantize: every backend against the spec (reference.quantize, docs/design.md §2.1): lookup's codes and
distances, the chosen rows bit-exact, the float64-accumulated loss sum, the non-finite row report,
and the straight-through + commitment gradient."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, lookup, quantize, reference
from vqdna.kernels.ops.registry import backend_op
from tests.conftest import backend_case_params, backend_params, require_backend
from tests.kernels.ops.test_lookup import (
    assert_bit_identical,
    assert_lookup_matches,
    exact_and_screened,
    exact_distances,
    make_inputs,
    near_tie_inputs,
    requires_screen,
)
from tests.tolerances import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ids = lambda t: str(t).split(".")[-1]  # noqa: E731
# (N, K, D): one row, one code, D not a multiple of 16 (nor of the 6-row / 16-code tiles), rows over
# several Triton programs / CUDA blocks, D over several Triton chunks, large K.
SHAPES = [(1, 1, 1), (1, 5, 17), (7, 1, 3), (200, 33, 17), (40, 300, 130), (131, 4096, 40)]
# The Triton interpreter runs on the CPU at ~1 ms per tile step: larger cases go behind `slow`.
_INTERPRETER_BUDGET = 3_000_000  # N * K * D


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
@pytest.mark.parametrize(
    "backend,device,n,k,d", backend_case_params(SHAPES, lambda n, k, d: n * k * d > _INTERPRETER_BUDGET, op="quantize")
)
def test_quantize_matches_reference(backend, device, n, k, d, dtype, rng, poison):
    require_backend(backend, device, "quantize")
    z, codebook = make_inputs(n, k, d, dtype, device, rng)
    out = quantize(z, codebook, backend=backend)
    assert dispatch.last_backend("quantize") == backend
    assert_quantize_matches(z, codebook, out, dtype)
    # One search: the codes and distances of this backend's lookup, bit for bit (same tiles, same
    # tie rule, same distance formula).
    codes, dist = lookup(z, codebook, backend=backend)
    assert torch.equal(out[0], codes) and torch.equal(out[2], dist)


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
    # check runs without grad; the gradient has its own test above. (Not for Triton on the CPU: the
    # interpreter reads the data pointers of the traced fake tensors, as for lookup.)
    if not (backend == "triton" and device == "cpu"):
        torch.library.opcheck(op, (z, codebook, sq), test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize(
    "z_shape,cb_shape,z_dtype,cb_dtype,exc,match",
    [
        ((4, 8), (3, 9), torch.float32, torch.float32, ValueError, "quantize: dimension mismatch"),
        ((4, 8), (0, 8), torch.float32, torch.float32, ValueError, "quantize: the codebook is empty"),
        ((4, 8), (3, 8), torch.float32, torch.float16, TypeError, "quantize: dtype mismatch"),
        ((4, 8), (8,), torch.float32, torch.float32, ValueError, r"quantize: codebook must have shape \[K, D\]"),
        ((4, 8), (3, 8), torch.int32, torch.int32, TypeError, "quantize: z has dtype"),
        ((), (3, 8), torch.float32, torch.float32, ValueError, r"quantize: z must have shape \[\.\.\., D\]"),
    ],
)
def test_clear_errors_name_quantize(backend, z_shape, z_dtype, cb_shape, cb_dtype, exc, match):
    """The checks are lookup's, but a quantize call's error names quantize (before any backend runs)."""
    with pytest.raises(exc, match=match):
        quantize(torch.ones(z_shape).to(z_dtype), torch.ones(cb_shape).to(cb_dtype), backend=backend)
    with pytest.raises(ValueError, match="quantize: codebook_sqnorm must have shape"):
        quantize(torch.ones(4, 8), torch.ones(3, 8), codebook_sqnorm=torch.ones(4), backend=backend)


def test_auto_picks_the_gpu_backends_on_cuda_first():
    """select_backend's order on CUDA tensors reaches the new backends (no GPU needed: the declaration)."""
    from vqdna.kernels.ops.registry import declaration

    assert declaration("quantize").backends == ("cuda", "triton", "native", "reference")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_steady_state_calls_do_not_sync_cuda(backend, rng):
    """The loss sum and the non-finite report stay on the GPU: after the first call (Triton autotunes
    then), a call launches without a host sync."""
    require_backend(backend, "cuda", "quantize")
    z, codebook = make_inputs(4096, 512, 384, torch.bfloat16, "cuda", rng)
    want = quantize(z, codebook, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = quantize(z, codebook, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The autotuner's trial runs of the first call did not leave their sums in the scratch.
    assert torch.equal(got[0], want[0]) and torch.equal(got[4], want[4])
    assert abs(float(got[3]) - float(want[3])) <= 2**-23 * abs(float(want[3]))
    assert_quantize_matches(z, codebook, got, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("which", ["z", "codebook", "both"])
def test_cuda_misaligned_inputs(dtype, which, rng, poison):
    """D % 8 == 0 but a pointer off a 16-byte boundary: element-wise tile loads and row copies, and
    the same outputs as the aligned call."""
    require_backend("cuda", "cuda", "quantize")
    from tests.conftest import misaligned

    z, cb = make_inputs(1000, 513, 64, dtype, "cuda", rng)
    zm = misaligned(z) if which in ("z", "both") else z
    cbm = misaligned(cb) if which in ("codebook", "both") else cb
    got = quantize(zm, cbm, backend="cuda")
    want = quantize(z, cb, backend="cuda")
    for g, w in zip(got, want):
        assert torch.equal(g, w) if g.dim() else abs(float(g) - float(w)) <= 2**-23 * abs(float(w))
    assert_quantize_matches(z, cb, got, dtype)


# ---- the native backend's bf16-screened search (csrc/common/cpu_bf16_screen.h): every output
# bit-identical to the exact float32 search.


@requires_screen
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("case", ["random-1-5-17", "random-200-33-17", "random-131-4096-40", "random-100-512-384",
                                  "rounding", "ulp", "duplicates", "nonfinite"])
def test_native_screened_quantize_is_bit_identical(case, dtype, rng, monkeypatch, poison):
    if case.startswith("random"):
        n, k, d = map(int, case.split("-")[1:])
        z, codebook = make_inputs(n, k, d, dtype, "cpu", rng)
    elif case == "nonfinite":
        z, codebook = make_inputs(60, 300, 70, dtype, "cpu", rng)
        z[5, 3], z[40] = math.nan, math.inf
    else:
        z, codebook = near_tie_inputs(case, 90, 64, dtype, rng)
    want, got, stats = exact_and_screened(lambda: quantize(z, codebook, backend="native"), monkeypatch)
    assert stats["search"] == "bf16" and stats["rows_screened"] > 0, stats
    assert_bit_identical(want, got)


def _cosine_inputs(n, k, d, dtype, device, rng):
    """Rows of z at scales from 1e-3 to 10 (row 0 all zero, row 1 below the 1e-6 norm clamp) and a
    unit codebook: what VectorQuantizer(use_cosine_sim=True) passes with normalize=True."""
    z, codebook = make_inputs(n, k, d, torch.float32, "cpu", rng)
    z = z * 10.0 ** (4 * torch.rand(n, 1, generator=rng) - 3)
    if n > 2:
        z[0], z[1] = 0.0, z[1] * 1e-8
    return z.to(dtype).to(device), reference.l2norm(codebook).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize(
    "backend,device,n,k,d", backend_case_params(SHAPES, lambda n, k, d: n * k * d > _INTERPRETER_BUDGET, op="quantize")
)
def test_normalize_is_quantize_of_the_unit_rows(backend, device, n, k, d, dtype, rng, poison):
    """normalize=True: every output is that of the unit rows l2norm(z) (the native kernel normalises
    each row as it packs it; the others normalise z first), on the backend asked for."""
    require_backend(backend, device, "quantize")
    z, codebook = _cosine_inputs(n, k, d, dtype, device, rng)
    out = quantize(z, codebook, backend=backend, normalize=True)
    assert dispatch.last_backend("quantize") == backend
    assert_quantize_matches(reference.l2norm(z), codebook, out, dtype)
    if n > 2:
        assert float(out[2][0]) == pytest.approx(float(codebook[out[0][0].long()].float().pow(2).sum()), rel=1e-2)  # |0 - e|^2


@pytest.mark.parametrize("backend,device", backend_params("quantize"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_normalize_gradient_goes_through_l2norm(backend, device, dtype, rng, poison):
    """The straight-through + commitment gradient with respect to u = l2norm(z), taken through
    l2norm's Jacobian: what autograd gives for torch's normalize followed by the unit-row quantize."""
    require_backend(backend, device, "quantize")
    z, codebook = _cosine_inputs(40, 9, 13, dtype, device, rng)
    z.requires_grad_(True)
    codes, quantized, dist, sqdist_sum, _ = quantize(z.reshape(4, 10, 13), codebook, backend=backend, normalize=True)
    g = torch.randn(quantized.shape, generator=rng).to(device)
    w = torch.rand(dist.shape, generator=rng).to(device)
    ((quantized.float() * g).sum() + 0.7 * sqdist_sum + (dist * w).sum()).backward()
    zz = z.detach().float().clone().requires_grad_(True)
    u = torch.nn.functional.normalize(zz, dim=-1, eps=1e-6)
    q = codebook.float()[codes.reshape(-1).long()]
    sq = (u - q).pow(2).sum(-1)
    ((u + (q - u).detach()) * g.reshape(40, 13).to(dtype).float()).sum().add(0.7 * sq.sum() + (sq * w.reshape(40)).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = zz.grad.abs().amax(-1, keepdim=True)  # row 1's gradient is ~1e6 (the norm clamp)
    torch.testing.assert_close(z.grad.float() / scale, (zz.grad / scale).to(dtype).float(), rtol=tol, atol=tol)
    assert z.grad.dtype == dtype
