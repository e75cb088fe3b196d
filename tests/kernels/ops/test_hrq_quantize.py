"""hrq_quantize: every backend against the reference (docs/design.md §2.2), forward and gradients."""

import math

import pytest
import torch

from tests.conftest import backend_case_params, backend_params, require_backend
from tests.kernels.ops.test_lookup import exact_distances
from tests.tolerances import TOL
from vqdna.kernels import dispatch, hrq_quantize, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (N, D, codebook sizes)
    (0, 8, (4, 6)),
    (1, 1, (1, 2)),
    (7, 3, (2, 5, 3)),
    (100, 17, (64, 130)),
    (257, 64, (8, 64, 513)),
    (1000, 384, (64, 512)),
]
# (backend, device, dtype, *shape); the Triton interpreter (~1 ms per tile step) runs the large ones under `slow`.
CASES = backend_case_params(
    [(t, *s) for t in DTYPES for s in SHAPES], lambda t, n, d, sizes: n * d * sum(sizes) > 3_000_000, op="hrq_quantize"
)


def make_levels(n, d, sizes, dtype, device, gen):
    """Z_l drawn so that the residual doubling has something to find: Z_0 near level-0 codes,
    Z_l near (C_{l-1}[m] + C_l[m']) / 2 plus noise."""
    codebooks = [torch.randn(k, d, generator=gen) * (0.5**level) for level, k in enumerate(sizes)]
    zs, prev = [], None
    for level, cb in enumerate(codebooks):
        target = cb[torch.randint(cb.shape[0], (n,), generator=gen)]
        z = target if prev is None else (target + prev) / 2
        zs.append(z + 0.1 * torch.randn(n, d, generator=gen))
        prev = target
    return [z.to(dtype).to(device) for z in zs], [c.to(dtype).to(device) for c in codebooks]


def check_level_codes(h, codebook, codes, dtype):
    """Codes of one level against the truth for that level's input H (near-ties may differ)."""
    exact = exact_distances(h, codebook)
    codes = codes.cpu().long()
    scale = h.double().cpu().pow(2).sum(-1) + codebook.double().cpu().pow(2).sum(-1).max()
    tol = TOL[dtype] * scale + 1e-9
    chosen = exact.gather(1, codes[:, None])[:, 0]
    excess = chosen - exact.min(1).values
    assert bool((excess <= tol).all()), f"level codes farther than tolerance: max excess {float(excess.max()):.3g}"


@pytest.mark.parametrize("backend,device,dtype,n,d,sizes", CASES)
def test_hrq_matches_reference(backend, device, dtype, n, d, sizes, rng, poison):
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = make_levels(n, d, sizes, dtype, device, rng)
    codes, levels = hrq_quantize(zs, codebooks, backend=backend)
    assert dispatch.last_backend("hrq_quantize") == backend
    assert codes.shape == (len(sizes), n) and codes.dtype == torch.int32
    assert levels.shape == (len(sizes), n, d) and levels.dtype == dtype
    # Walk the levels with the backend's own codes: each level's H follows from the previous
    # level's chosen code, so a near-tie upstream cannot cascade into a spurious failure.
    running = torch.zeros(n, d, dtype=torch.float64)
    for level, (z, cb) in enumerate(zip(zs, codebooks)):
        m = codes[level].cpu().long()
        assert bool(((m >= 0) & (m < cb.shape[0])).all())
        h = z.cpu() if level == 0 else 2.0 * z.cpu() - codebooks[level - 1].cpu()[codes[level - 1].cpu().long()]
        check_level_codes(h, cb.cpu(), m, dtype)
        running += cb.cpu().double()[m]
        expected = (running / (level + 1)).to(dtype)
        got = levels[level].cpu()
        assert torch.allclose(got.double(), expected.double(), rtol=0, atol=0) or torch.allclose(
            got.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6
        ), f"level {level}: zhat differs by {float((got.double() - expected.double()).abs().max()):.3g}"
    # Away from near-ties the whole result equals the reference.
    ref_codes, ref_levels = reference.hrq_quantize([z.cpu() for z in zs], [c.cpu() for c in codebooks])
    agree = (ref_codes == codes.cpu()).float().mean().item() if n else 1.0
    assert agree > 0.98, f"only {agree:.3f} of codes agree with the reference"


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
def test_hrq_exact_ties(backend, device, rng, poison):
    require_backend(backend, device, "hrq_quantize")
    d = 12
    base0 = torch.randint(-2, 3, (20, d), generator=rng).float()
    base1 = torch.randint(-2, 3, (30, d), generator=rng).float()
    c0 = base0[torch.arange(80) % 20]  # duplicates in several tiles
    c1 = base1[torch.arange(150) % 30]
    z0 = torch.randint(-2, 3, (200, d), generator=rng).float()
    z1 = torch.randint(-2, 3, (200, d), generator=rng).float()
    ref_codes, ref_levels = reference.hrq_quantize([z0, z1], [c0, c1])
    codes, levels = hrq_quantize([z0.to(device), z1.to(device)], [c0.to(device), c1.to(device)], backend=backend)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(levels.cpu(), ref_levels)


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
def test_hrq_gradients_equal_reference(backend, device, rng):
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = make_levels(50, 10, (4, 16, 8), torch.float32, device, rng)
    zs = [z.requires_grad_() for z in zs]
    _, levels = hrq_quantize(zs, codebooks, backend=backend)
    weight = torch.randn(levels.shape, generator=rng).to(device)
    grads = torch.autograd.grad((levels * weight).sum(), zs)
    ref_zs = [z.detach().cpu().requires_grad_() for z in zs]
    _, ref_levels = reference.hrq_quantize(ref_zs, [c.cpu() for c in codebooks])
    ref_grads = torch.autograd.grad((ref_levels * weight.cpu()).sum(), ref_zs)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.cpu(), r, atol=1e-6)
    # The straight-through slopes of docs/design.md §2.2 for the decoder input zhat = levels[-1].
    ones = torch.autograd.grad(hrq_quantize(zs, codebooks, backend=backend)[1][-1].sum(), zs)
    assert torch.allclose(ones[0], torch.full_like(ones[0], 1 / 3))
    assert torch.allclose(ones[1], torch.full_like(ones[1], 2 / 3))
    assert torch.allclose(ones[2], torch.full_like(ones[2], 2 / 3))


def test_reference_gradcheck_float64(rng):
    """The spec's own straight-through Jacobian in float64: d zhat / d Z_0 = I/L, d Z_1 = 2I/L."""
    zs, codebooks = make_levels(6, 4, (3, 5), torch.float64, "cpu", rng)
    zs = [z.requires_grad_() for z in zs]

    def f(a, b):
        _, levels = hrq_quantize([a, b], codebooks, backend="reference")
        return levels

    codes_before = hrq_quantize(zs, codebooks, backend="reference")[0]
    # gradcheck's numeric Jacobian would see the piecewise-constant forward (zero slope), so the
    # straight-through Jacobian is checked in closed form instead:
    jac = torch.autograd.functional.jacobian(lambda a, b: f(a, b)[-1], tuple(zs))
    n, d = zs[0].shape
    eye = torch.eye(n * d, dtype=torch.float64).reshape(n, d, n, d)
    assert torch.allclose(jac[0], eye / 2) and torch.allclose(jac[1], eye)
    assert torch.equal(hrq_quantize(zs, codebooks, backend="reference")[0], codes_before)


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
def test_hrq_opcheck(backend, device, rng):
    require_backend(backend, device, "hrq_quantize")
    from vqdna.kernels.ops.registry import backend_op

    zs, codebooks = make_levels(20, 9, (4, 7), torch.float32, device, rng)
    leaves = [z.clone().requires_grad_() for z in zs]
    packed = torch.cat(codebooks)
    op = backend_op("hrq_quantize", backend)
    args = (leaves, packed, packed.pow(2).sum(-1), [4, 7])
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    if not (backend == "triton" and device == "cpu"):
        # opcheck's backward harness cannot sum an int32 output together with float ones, so the
        # compiled-dispatch check runs without grad; gradients are compared in their own test.
        torch.library.opcheck(op, ([z.detach() for z in leaves], *args[1:]), test_utils=("test_aot_dispatch_dynamic",))


def test_hrq_errors():
    with pytest.raises(ValueError, match="L >= 1"):
        hrq_quantize([], [])
    with pytest.raises(ValueError, match="shape"):
        hrq_quantize([torch.randn(3, 4), torch.randn(2, 4)], [torch.randn(2, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="dimension mismatch"):
        hrq_quantize([torch.randn(3, 4)], [torch.randn(2, 5)])


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("n,d,sizes", [(1, 1, (1, 2)), (7, 3, (2, 5, 3)), (100, 17, (64, 130))], ids=lambda v: str(v))
def test_hrq_out_equals_functional(backend, device, dtype, n, d, sizes, rng):
    """out= writes every element of poisoned, caller-owned buffers, returns them, and equals the
    functional call bit for bit; a second call into the same buffers with new inputs overwrites them."""
    require_backend(backend, device, "hrq_quantize")
    codes_out = torch.full((len(sizes), n), -7, dtype=torch.int32, device=device)
    levels_out = torch.full((len(sizes), n, d), float("nan"), dtype=dtype, device=device)
    for _ in range(2):
        zs, codebooks = make_levels(n, d, sizes, dtype, device, rng)
        codes, levels = hrq_quantize(zs, codebooks, backend=backend)
        got = hrq_quantize(zs, codebooks, backend=backend, out=(codes_out, levels_out))
        assert dispatch.last_backend("hrq_quantize") == backend
        assert got[0] is codes_out and got[1] is levels_out
        assert torch.equal(codes_out, codes) and torch.equal(levels_out, levels)


def test_hrq_out_leading_shape_and_errors(rng):
    zs, codebooks = make_levels(12, 5, (3, 4), torch.float32, "cpu", rng)
    zs3 = [z.view(3, 4, 5) for z in zs]
    codes, levels = hrq_quantize(zs3, codebooks)
    out = (torch.empty(2, 3, 4, dtype=torch.int32), torch.empty(2, 3, 4, 5))
    assert torch.equal(hrq_quantize(zs3, codebooks, out=out)[1], levels) and torch.equal(out[0], codes)
    with pytest.raises(ValueError, match="out codes must be a contiguous torch.int32 tensor of shape \\(2, 3, 4\\)"):
        hrq_quantize(zs3, codebooks, out=(torch.empty(2, 12, dtype=torch.int32), out[1]))
    with pytest.raises(ValueError, match="zhat_levels .* got torch.float64"):
        hrq_quantize(zs3, codebooks, out=(out[0], torch.empty(2, 3, 4, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="not contiguous"):
        hrq_quantize(zs3, codebooks, out=(out[0], torch.empty(5, 4, 3, 2).permute(3, 2, 1, 0)))
    with pytest.raises(RuntimeError, match="autograd"):
        hrq_quantize([z.requires_grad_() for z in zs3], codebooks, out=out)


def test_hrq_native_out_rejects_overlap(rng):
    require_backend("native", "cpu", "hrq_quantize")
    zs, codebooks = make_levels(8, 4, (3, 4), torch.float32, "cpu", rng)
    packed = torch.cat(codebooks)
    levels = torch.stack(zs)  # the output aliases the inputs
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.vqdna.hrq_quantize_native_out([levels[0], levels[1]], packed, packed.pow(2).sum(-1), [3, 4],
                                                torch.empty(2, 8, dtype=torch.int32), levels)


# --- the spec's rounding, exactly (docs/design.md §2.2) -----------------------------------------------------

# Significant bits (with the implicit one) of the low-precision dtypes.
_PRECISION = {torch.bfloat16: 8, torch.float16: 11}


def _spec_h(zs, codebooks, codes, level):
    """H_l as the spec computes it in the dtype of zs: `2.0 * z` rounded, minus the previous code, rounded."""
    if level == 0:
        return zs[0]
    return 2.0 * zs[level] - codebooks[level - 1][codes[level - 1].long()]


def _decisive_rows(dtype, d):
    """Rows (z_0, z_1) along e_0 whose level-1 code is decided by the spec's rounding, and the codes
    (level-0 codebook rows, level-1 codebook rows) they need.

    Rounding H: with u the ulp at 2, z_1 = (1 + u/2) e_0 and a previous code c = (u/2 + u/32) e_0
    give H_1 = 2 + u/2 - u/32 in float32, just below the midpoint 2 + u/2, so the dtype rounds it to
    2: the code a = 2 - u/2 wins there, while the unrounded value is nearer b = 2 + u. Every value
    and distance of these rows is exact in float32, on every backend.
    Rounding 2 Z (float16 only): z_1 = 32800 e_0 doubles to 65600, which is inf in float16, so
    H_1 = inf e_0 and the first code with a positive e_0 wins (its score is -inf); unrounded,
    2 z_1 - 1024 e_0 = 64576 is finite and nearest to the code 60000 e_0.
    """
    u = 2.0 ** -(_PRECISION[dtype] - 2)
    e0 = torch.zeros(d)
    e0[0] = 1.0
    z0 = [(u / 2 + u / 32) * e0]
    z1 = [(1 + u / 2) * e0]
    level0 = [(u / 2 + u / 32) * e0]
    level1 = [(2 - u / 2) * e0, (2 + u) * e0]
    if dtype == torch.float16:
        z0.append(1024.0 * e0)
        z1.append(32800.0 * e0)
        level0.append(1024.0 * e0)
        level1.append(60000.0 * e0)
    return torch.stack(z0), torch.stack(z1), torch.stack(level0), torch.stack(level1)


def _clean_rows(zs, codebooks, codes, margin=1e-4):
    """Rows whose code at every level beats the runner-up by `margin` of the terms' size (no
    near-tie that float32 summation order could flip), judged on the spec's H in float64."""
    keep = torch.ones(zs[0].shape[0], dtype=torch.bool)
    for level, cb in enumerate(codebooks):
        h = _spec_h(zs, codebooks, codes, level).double()
        dist = exact_distances(h, cb)
        two = dist.topk(2, dim=1, largest=False)
        size = h.pow(2).sum(-1) + cb.double().pow(2).sum(-1)[two.indices].sum(-1)
        keep &= (two.values[:, 1] - two.values[:, 0]) > margin * size
    return keep


def exact_hrq_case(dtype, n=200, d=16, sizes=(8, 24, 40)):
    """3-level inputs of N >= n rows (random rows without near-ties, then, for bfloat16/float16,
    rows whose codes the rounding of 2 Z and of H decides); the same data for every backend."""
    gen = torch.Generator().manual_seed(2024)
    zs, codebooks = make_levels(3 * n, d, sizes, torch.float32, "cpu", gen)
    zs, codebooks = [z.to(dtype) for z in zs], [c.to(dtype) for c in codebooks]
    keep = _clean_rows(zs, codebooks, reference.hrq_quantize(zs, codebooks)[0])
    assert int(keep.sum()) >= n
    zs = [z[keep][:n] for z in zs]
    if dtype in _PRECISION:
        z0, z1, extra0, extra1 = _decisive_rows(dtype, d)
        m = z0.shape[0]
        assert bool((codebooks[1][:, 0] > 0).any())  # inf e_0 has a code to go to
        codebooks[0] = torch.cat([codebooks[0], extra0.to(dtype)])
        codebooks[1] = torch.cat([codebooks[1], extra1.to(dtype)])
        z2 = 0.5 * torch.randn(m, d, generator=gen)
        zs = [torch.cat([z, extra.to(dtype)]) for z, extra in zip(zs, (z0, z1, z2))]
    return zs, codebooks


# float16 rows with 2 Z = inf: numpy (the Triton interpreter) warns about the overflow it is meant to do.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast", "ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_hrq_rounding_is_exactly_the_spec(backend, device, dtype, poison):
    """Codes equal the spec's and zhat_levels[l] is bit for bit float32 sum of the chosen codes,
    one division by l + 1, one rounding to the dtype; on rows where rounding 2 Z (float16) and H
    decide the level-1 code too."""
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = exact_hrq_case(dtype)
    n = zs[0].shape[0]
    want_codes, _ = reference.hrq_quantize(zs, codebooks)
    if dtype in _PRECISION:
        # The decisive rows (after the first 200) are decided as designed, by the rounded 2 Z and H:
        # code a (appended after the 24 random level-1 codes), and for float16 the first code with a
        # positive e_0; unrounded, b and the code 60000 e_0 (the last) would win.
        first_positive = int((codebooks[1][:, 0] > 0).nonzero()[0])
        assert want_codes[1, 200:].tolist() == [24, first_positive][: n - 200]
        unrounded = 2.0 * zs[1][200:].float() - codebooks[0].float()[want_codes[0, 200:].long()]
        assert reference.lookup(unrounded, codebooks[1].float())[0].tolist() == [25, codebooks[1].shape[0] - 1][: n - 200]
    codes, levels = hrq_quantize([z.to(device) for z in zs], [c.to(device) for c in codebooks], backend=backend)
    assert dispatch.last_backend("hrq_quantize") == backend
    assert torch.equal(codes.cpu(), want_codes)
    running = torch.zeros(n, zs[0].shape[1], dtype=torch.float32)
    for level, cb in enumerate(codebooks):
        running += cb.float()[want_codes[level].long()]
        want = (running / (level + 1)).to(dtype)
        assert torch.equal(levels[level].cpu(), want), f"level {level}: {int((levels[level].cpu() != want).sum())} values differ"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("which", ["level0", "level1", "all"])
def test_cuda_misaligned_levels_take_the_scalar_path(dtype, which, rng, poison):
    """D % 8 == 0 but some Z_l off a 16-byte boundary: the CUDA kernel forms its A tiles with
    element-wise loads (no deferred 16-byte loads) and returns exactly what the aligned call does."""
    require_backend("cuda", "cuda", "hrq_quantize")
    from tests.conftest import misaligned

    n, d, sizes = 1000, 64, (64, 512, 130)
    zs, codebooks = make_levels(n, d, sizes, dtype, "cuda", rng)
    off = {"level0": [0], "level1": [1], "all": [0, 1, 2]}[which]
    mis = [misaligned(z) if level in off else z for level, z in enumerate(zs)]
    codes, levels = hrq_quantize(mis, codebooks, backend="cuda")
    want_codes, want_levels = hrq_quantize(zs, codebooks, backend="cuda")
    assert torch.equal(codes, want_codes) and torch.equal(levels, want_levels)
    ref_codes, _ = reference.hrq_quantize([z.cpu() for z in zs], [c.cpu() for c in codebooks])
    assert (ref_codes == codes.cpu()).float().mean().item() > 0.98


# --- the fused per-level loss sums, the non-finite report and the codes-only mode (issue 17) ------------------

LOSS_SHAPES = [(1, 1, (1, 2)), (1, 17, (1, 1)), (7, 3, (2, 5, 3)), (100, 17, (64, 130))]
LOSS_CASES = backend_case_params(
    [(t, *s) for t in DTYPES for s in LOSS_SHAPES], lambda t, n, d, sizes: n * d * sum(sizes) > 300_000,
    op="hrq_quantize",
)


def _sqdist_tolerance(zs, levels):
    """Per row: float32 summation-order error of ||Z_l - zhat_l||^2, relative to its terms' size."""
    size = torch.stack([z.double().cpu().pow(2).sum(-1) + lv.double().cpu().pow(2).sum(-1) for z, lv in zip(zs, levels)])
    return TOL[torch.float32] * 4 * size + 1e-12


@pytest.mark.parametrize("backend,device,dtype,n,d,sizes", LOSS_CASES)
def test_hrq_losses_match_reference(backend, device, dtype, n, d, sizes, rng, poison):
    """losses=True: the same codes and zhat_levels as without, and per level the rows' ||Z_l - zhat_l||^2,
    their sum and the non-finite report of reference.hrq_level_losses on the backend's own zhat_levels."""
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = make_levels(n, d, sizes, dtype, device, rng)
    codes, levels, sqdist, sqdist_sum, nonfinite = hrq_quantize(zs, codebooks, backend=backend, losses=True)
    assert dispatch.last_backend("hrq_quantize") == backend
    plain_codes, plain_levels = hrq_quantize(zs, codebooks, backend=backend)
    assert torch.equal(codes, plain_codes) and torch.equal(levels, plain_levels)
    assert sqdist.shape == (len(sizes), n) and sqdist.dtype == torch.float32
    assert sqdist_sum.shape == (len(sizes),) and sqdist_sum.dtype == torch.float32
    assert nonfinite.dtype == torch.int64 and nonfinite.device.type == torch.device(device).type
    assert nonfinite.tolist() == [[0, -1]] * len(sizes)
    want, want_sum, _ = reference.hrq_level_losses([z.cpu() for z in zs], levels.cpu())
    tol = _sqdist_tolerance(zs, levels)
    assert bool(((sqdist.cpu().double() - want.double()).abs() <= tol).all()), float((sqdist.cpu() - want).abs().max())
    assert bool(((sqdist_sum.cpu().double() - want_sum.double()).abs() <= tol.sum(-1)).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_hrq_nonfinite_rows_are_reported_per_level(backend, device, dtype, rng, poison):
    """NaN/Inf rows of Z_l: sqdist[l] is non-finite exactly there, the report says (count, first row)
    per level on the device, and every other row is quantized as without them."""
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = make_levels(40, 19, (3, 8), dtype, "cpu", rng)
    zs[0][4, 2] = float("inf")
    zs[1][5, 0] = float("nan")
    zs[1][3, 18] = float("-inf")
    codes, levels, sqdist, sqdist_sum, nonfinite = hrq_quantize(
        [z.to(device) for z in zs], [c.to(device) for c in codebooks], backend=backend, losses=True)
    assert nonfinite.device.type == torch.device(device).type
    # Row 4 of Z_0 is inf: the reference's straight-through sum (inf - inf) makes that row's zhat NaN at
    # every level, the kernels' zhat (the mean of the chosen codes) stays finite, so level 1 may count it.
    bad = (~torch.isfinite(sqdist.cpu())).nonzero().tolist()
    assert [0, 4] in bad and [1, 3] in bad and [1, 5] in bad and set(map(tuple, bad)) <= {(0, 4), (1, 3), (1, 4), (1, 5)}
    assert nonfinite.tolist() == [[1, 4], [len(bad) - 1, 3]]
    assert not math.isfinite(float(sqdist_sum[0])) and not math.isfinite(float(sqdist_sum[1]))
    ref_codes, ref_levels = reference.hrq_quantize(zs, codebooks)
    good = torch.ones(40, dtype=torch.bool)
    good[[3, 4, 5]] = False
    assert torch.equal(codes.cpu()[:, good], ref_codes[:, good])
    assert torch.equal(levels.cpu()[:, good], ref_levels[:, good])


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("n,d,sizes", [(0, 8, (4, 6)), (1, 1, (1, 2)), (7, 3, (2, 5, 3)), (100, 17, (64, 130))],
                         ids=lambda v: str(v))
def test_hrq_codes_only_equals_the_full_call(backend, device, dtype, n, d, sizes, rng, poison):
    """codes_only=True: the codes of the full call, every one written (poisoned outputs), and no
    zhat_levels (the op's other outputs are empty); leading dimensions kept."""
    require_backend(backend, device, "hrq_quantize")
    from vqdna.kernels.ops.registry import backend_op

    zs, codebooks = make_levels(n, d, sizes, dtype, device, rng)
    want, _ = hrq_quantize(zs, codebooks, backend=backend)
    got = hrq_quantize(zs, codebooks, backend=backend, codes_only=True)
    assert dispatch.last_backend("hrq_quantize") == backend
    assert got.dtype == torch.int32 and torch.equal(got, want)
    if n:
        lead = hrq_quantize([z.view(1, n, d) for z in zs], codebooks, backend=backend, codes_only=True)
        assert lead.shape == (len(sizes), 1, n) and torch.equal(lead[:, 0], want)
    packed = torch.cat(codebooks)
    outs = backend_op("hrq_quantize", backend)(zs, packed, packed.float().pow(2).sum(-1), list(sizes), True)
    assert torch.equal(outs[0], want) and all(t.numel() == 0 for t in outs[1:])


def test_hrq_codes_only_and_losses_errors(rng):
    zs, codebooks = make_levels(6, 4, (3, 4), torch.float32, "cpu", rng)
    out = (torch.empty(2, 6, dtype=torch.int32), torch.empty(2, 6, 4))
    with pytest.raises(ValueError, match="codes_only=True takes neither"):
        hrq_quantize(zs, codebooks, codes_only=True, out=out)
    with pytest.raises(ValueError, match="codes_only=True takes neither"):
        hrq_quantize(zs, codebooks, codes_only=True, losses=True)
    with pytest.raises(ValueError, match="out= does not return losses"):
        hrq_quantize(zs, codebooks, out=out, losses=True)
    # codes-only never records autograd: the codes need none
    assert not hrq_quantize([z.requires_grad_() for z in zs], codebooks, codes_only=True).requires_grad


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
def test_hrq_loss_gradients_equal_reference(backend, device, rng):
    """Gradients through zhat_levels, sqdist and sqdist_sum together (the op's autograd formula)
    equal the reference's autograd of hrq_quantize + hrq_level_losses."""
    require_backend(backend, device, "hrq_quantize")
    zs, codebooks = make_levels(30, 10, (4, 16, 8), torch.float32, device, rng)
    zs = [z.requires_grad_() for z in zs]
    w_levels = torch.randn(3, 30, 10, generator=rng)
    w_rows = torch.randn(3, 30, generator=rng)
    w_sum = torch.randn(3, generator=rng)

    def objective(levels, sqdist, sqdist_sum):
        return (levels * w_levels.to(levels.device)).sum() + (sqdist * w_rows.to(sqdist.device)).sum() \
            + (sqdist_sum * w_sum.to(sqdist.device)).sum()

    _, levels, sqdist, sqdist_sum, _ = hrq_quantize(zs, codebooks, backend=backend, losses=True)
    grads = torch.autograd.grad(objective(levels, sqdist, sqdist_sum), zs)
    ref_zs = [z.detach().cpu().requires_grad_() for z in zs]
    _, ref_levels = reference.hrq_quantize(ref_zs, [c.cpu() for c in codebooks])
    ref_sqdist, ref_sum, _ = reference.hrq_level_losses(ref_zs, ref_levels)
    ref_grads = torch.autograd.grad(objective(ref_levels, ref_sqdist, ref_sum), ref_zs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), r, atol=1e-5, rtol=1e-5)
    # The loss alone: 2 (Z_l - zhat_l) per unit of sqdist_sum[l], zhat detached.
    only = torch.autograd.grad(hrq_quantize(zs, codebooks, backend=backend, losses=True)[3][1], zs)
    torch.testing.assert_close(only[1].cpu(), 2 * (zs[1].detach() - levels[1].detach()).cpu(), atol=1e-6, rtol=1e-6)
    assert float(only[0].abs().max()) == 0.0 and float(only[2].abs().max()) == 0.0


@pytest.mark.parametrize("backend,device", backend_params("hrq_quantize"))
def test_hrq_codes_only_opcheck(backend, device, rng):
    require_backend(backend, device, "hrq_quantize")
    from vqdna.kernels.ops.registry import backend_op

    zs, codebooks = make_levels(20, 9, (4, 7), torch.float32, device, rng)
    packed = torch.cat(codebooks)
    torch.library.opcheck(backend_op("hrq_quantize", backend), (zs, packed, packed.pow(2).sum(-1), [4, 7], True),
                          test_utils=("test_schema", "test_faketensor"))
