"""lookup: every backend against the float64 reference (docs/design.md §2.1)."""

import itertools
import math

import pytest
import torch

import vqdna
from vqdna.kernels import dispatch, lookup, reference
from tests.conftest import backend_params, require_backend
from tests.tolerances import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NS = [0, 1, 7, 1000]
DS = [1, 3, 17, 64, 384, 1030]
KS = [1, 2, 513, 4096]

# The Triton interpreter runs on the CPU at ~1 ms per tile step: larger problems go behind `slow`.
_INTERPRETER_BUDGET = 3_000_000  # N * K * D


def _backend_shape_params():
    """(backend, device, n, k, d); Triton-on-CPU cases above the interpreter budget carry `slow`."""
    params = []
    for bp in backend_params("lookup"):
        backend, device = bp.values
        for n, k, d in itertools.product(NS, KS, DS):
            marks = list(bp.marks)
            if backend == "triton" and device == "cpu" and n * k * d > _INTERPRETER_BUDGET:
                marks.append(pytest.mark.slow)
            params.append(pytest.param(backend, device, n, k, d, marks=marks, id=f"{bp.id}-N{n}-K{k}-D{d}"))
    return params


def make_inputs(n, k, d, dtype, device, gen):
    """Codebook ~ N(0, 1); half the rows of z near a code (the realistic case), half uniform noise
    at a random scale. Rounded to `dtype`."""
    codebook = torch.randn(k, d, generator=gen)
    near = codebook[torch.randint(k, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)
    far = (torch.rand(n, d, generator=gen) * 2 - 1) * (0.5 + 3 * torch.rand(n, 1, generator=gen))
    pick = torch.rand(n, 1, generator=gen) < 0.5
    z = torch.where(pick, near, far)
    return z.to(dtype).to(device), codebook.to(dtype).to(device)


def exact_distances(z, codebook):
    """[N, K] float64 squared distances (the truth: float64 is ~1e-16 relative, and exact on the
    small integers of the tie tests)."""
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    out = z64.pow(2).sum(-1)[:, None] - 2.0 * (z64 @ e64.T) + e64.pow(2).sum(-1)[None, :]
    return out.clamp_min(0)


def assert_lookup_matches(z, codebook, codes, dist, dtype):
    """The contract of docs/design.md §2.1 checked on every row; finite rows only."""
    n, k = z.shape[0], codebook.shape[0]
    assert codes.dtype == torch.int32 and dist.dtype == torch.float32
    assert codes.shape == (n,) and dist.shape == (n,)
    codes, dist = codes.cpu().long(), dist.cpu().double()
    assert bool(((codes >= 0) & (codes < k)).all()), f"codes out of range: {codes[(codes < 0) | (codes >= k)][:5]}"
    if n == 0:
        return
    exact = exact_distances(z, codebook)
    sq = z.double().cpu().pow(2).sum(-1) + codebook.double().cpu().pow(2).sum(-1).max()
    tol = TOL[dtype] * sq + 1e-9
    true_min = exact.min(dim=1).values
    chosen = exact.gather(1, codes[:, None])[:, 0]
    excess = chosen - true_min
    bad = excess > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} rows chose a code farther than the tolerance; first row {int(bad.nonzero()[0])}: "
        f"excess {float(excess[bad][0]):.3g} > tol {float(tol[bad][0]):.3g}"
    )
    derr = (dist - chosen).abs()
    bad = derr > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} rows have a wrong distance; first row {int(bad.nonzero()[0])}: "
        f"got {float(dist[bad][0])}, exact {float(chosen[bad][0])}"
    )
    # Away from near-ties the code is the reference's, exactly.
    if k > 1:
        two = exact.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 2 * tol
        ref_codes = exact.argmin(dim=1)
        wrong = clear & (codes != ref_codes)
        assert not bool(wrong.any()), f"{int(wrong.sum())} rows differ from the reference away from ties"
    else:
        assert bool((codes == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("backend,device,n,k,d", _backend_shape_params())
def test_lookup_matches_reference(backend, device, dtype, n, k, d, rng, poison):
    require_backend(backend, device)
    z, codebook = make_inputs(n, k, d, dtype, device, rng)
    codes, dist = lookup(z, codebook, backend=backend)
    assert dispatch.last_backend("lookup") == backend
    assert_lookup_matches(z, codebook, codes, dist, dtype)


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("d", [5, 64, 130])
def test_exact_ties_pick_lowest_index(backend, device, dtype, d, rng, poison):
    """Small integers make every sum exact in any order, so duplicated codes tie exactly; the
    duplicates sit in different K tiles of every backend."""
    require_backend(backend, device)
    k = 700
    base = torch.randint(-3, 4, (100, d), generator=rng).float()
    codebook = base[torch.arange(k) % 100]  # row j == row j + 100 == row j + 200 ...
    perm = torch.randperm(k, generator=rng)
    codebook = codebook[perm]
    z = torch.randint(-3, 4, (300, d), generator=rng).float()
    z[:100] = codebook[torch.randint(k, (100,), generator=rng)]  # exact hits on duplicated codes
    exact = exact_distances(z, codebook)
    expected = exact.argmin(dim=1).to(torch.int32)  # torch returns the first minimum: lowest index
    codes, dist = lookup(z.to(dtype).to(device), codebook.to(dtype).to(device), backend=backend)
    assert torch.equal(codes.cpu(), expected)
    assert torch.equal(dist.cpu().double(), exact.min(dim=1).values)


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_nonfinite_rows(backend, device, dtype, rng, poison):
    require_backend(backend, device)
    n, k, d = 50, 300, 19
    z, codebook = make_inputs(n, k, d, dtype, "cpu", rng)
    z[3, 5] = math.nan
    z[10, 0] = math.inf
    z[11, 18] = -math.inf
    z[12] = math.nan
    bad_rows = torch.zeros(n, dtype=torch.bool)
    bad_rows[[3, 10, 11, 12]] = True
    codebook[7, 2] = math.nan  # a NaN code never wins against finite ones
    codes, dist = lookup(z.to(device), codebook.to(device), backend=backend)
    codes, dist = codes.cpu(), dist.cpu()
    assert not bool(torch.isfinite(dist[bad_rows]).any()), dist[bad_rows]
    assert bool(((codes >= 0) & (codes < k)).all())
    assert not bool((codes[~bad_rows] == 7).any())
    good = ~bad_rows
    keep = torch.ones(k, dtype=torch.bool)
    keep[7] = False
    remap = torch.arange(k)[keep]
    # The finite rows match a lookup over the finite codes.
    sub_codes, sub_dist = codes[good], dist[good]
    inv = torch.full((k,), -1, dtype=torch.long)
    inv[remap] = torch.arange(k - 1)
    assert_lookup_matches(
        z[good], codebook[keep], inv[sub_codes.long()].to(torch.int32), sub_dist, dtype
    )
    with pytest.raises(ValueError, match="row 3 holds NaN or Inf"):
        vqdna.kernels.raise_on_nonfinite(dist, "z")


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_rows_on_codes_are_at_distance_zero_or_more(backend, device, rng, poison):
    """A row equal to a code is at exact distance 0; in float32, ||e||^2 - 2 z.e + ||z||^2 cancels
    to a few ulps of either sign, and the clamp keeps the returned distance >= 0 (docs/design.md §2.1)."""
    require_backend(backend, device)
    codebook = torch.randn(64, 96, generator=rng) * 3
    z = codebook[torch.randperm(64, generator=rng)].repeat(4, 1)
    codes, dist = lookup(z.to(device), codebook.to(device), backend=backend)
    assert torch.equal(codebook[codes.cpu().long()], z)
    assert bool((dist.cpu() >= 0).all()), f"{int((dist < 0).sum())} negative distances"
    assert float(dist.max()) < 1e-3


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_leading_shape_layout_and_int64(backend, device, rng, poison):
    require_backend(backend, device)
    k, d = 37, 24
    big = torch.randn(2, 3, 5, 2 * d, generator=rng)
    z = big[..., ::2]  # non-contiguous
    codebook = torch.randn(d, k, generator=rng).T  # non-contiguous codebook
    assert not z.is_contiguous() and not codebook.is_contiguous()
    z, codebook = z.to(device), codebook.to(device)
    codes, dist = lookup(z, codebook, backend=backend, codes_dtype=torch.int64)
    assert codes.shape == (2, 3, 5) and codes.dtype == torch.int64 and dist.shape == (2, 3, 5)
    flat_codes, flat_dist = lookup(z.reshape(-1, d).contiguous(), codebook.contiguous(), backend=backend)
    assert torch.equal(codes.reshape(-1).to(torch.int32), flat_codes)
    assert torch.equal(dist.reshape(-1), flat_dist)
    sq = codebook.float().pow(2).sum(-1)
    c2, d2 = lookup(z, codebook, codebook_sqnorm=sq, backend=backend)
    assert torch.equal(c2.reshape(-1), flat_codes)


def _copies_of(shape, fn):
    """The aten copy/clone events on a tensor of `shape` while fn() runs (the C++ ones too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and list(shape) in e.input_shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", [(1, 24, 300), (3, 24, 5, 41)], ids=["B1", "B3-image"])
def test_native_reads_channel_first_z_in_place(dtype, shape, rng, poison):
    """Channel-first z ([B, D, ...] moved to [B, ..., D], as VectorQuantizer(channel_last=False)
    sees it): the native kernel packs it from its columns, with no transposing copy of z, and gives
    the bits of the contiguous copy (codes and dist)."""
    require_backend("native", "cpu")
    x = torch.randn(shape, generator=rng).to(dtype)
    z = x.movedim(1, -1)
    codebook = torch.randn(37, shape[1], generator=rng).to(dtype)
    codes, dist = lookup(z, codebook, backend="native")
    want_codes, want_dist = lookup(z.contiguous(), codebook, backend="native")
    assert torch.equal(codes, want_codes) and torch.equal(dist, want_dist)
    ref_codes, _ = lookup(z.contiguous(), codebook, backend="reference")
    assert torch.equal(codes, ref_codes)
    rows = math.prod(z.shape[:-1]) if shape[0] == 1 else math.prod(z.shape[1:-1])
    copied = _copies_of((rows, shape[1]), lambda: lookup(z, codebook, backend="native"))
    copied += _copies_of(tuple(z.shape), lambda: lookup(z, codebook, backend="native"))
    assert not copied, f"z was copied: {copied}"


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_empty_batch(backend, device, poison):
    require_backend(backend, device)
    codes, dist = lookup(torch.randn(0, 4, 8, device=device), torch.randn(3, 8, device=device), backend=backend)
    assert codes.shape == (0, 4) and dist.shape == (0, 4)


def test_float64_runs_on_reference_only(rng):
    z, e = torch.randn(9, 5, dtype=torch.float64, generator=rng), torch.randn(4, 5, dtype=torch.float64, generator=rng)
    codes, dist = lookup(z, e)
    assert dispatch.last_backend("lookup") == "reference"
    assert dist.dtype == torch.float64
    assert torch.equal(codes.long(), torch.cdist(z, e).argmin(1))
    with pytest.raises(TypeError, match="float64"):
        lookup(z, e, backend="native")


@pytest.mark.parametrize(
    "z_shape,cb_shape,z_dtype,cb_dtype,exc,match",
    [
        ((4, 8), (3, 9), torch.float32, torch.float32, ValueError, "dimension mismatch"),
        ((4, 8), (0, 8), torch.float32, torch.float32, ValueError, "empty"),
        ((4, 8), (3, 8), torch.float32, torch.float16, TypeError, "dtype mismatch"),
        ((4, 8), (8,), torch.float32, torch.float32, ValueError, r"\[K, D\]"),
        ((4, 8), (3, 8), torch.int32, torch.int32, TypeError, "dtype"),
        ((), (3, 8), torch.float32, torch.float32, ValueError, "shape"),
    ],
)
def test_clear_errors(z_shape, cb_shape, z_dtype, cb_dtype, exc, match):
    z = torch.ones(z_shape).to(z_dtype)
    cb = torch.ones(cb_shape).to(cb_dtype)
    with pytest.raises(exc, match=match):
        lookup(z, cb)


def test_device_mismatch_and_unknown_backend():
    with pytest.raises(ValueError, match="device mismatch"):
        lookup(torch.randn(4, 8, device="meta"), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="unknown backend"):
        lookup(torch.randn(4, 8), torch.randn(3, 8), backend="fastest")
    with pytest.raises(RuntimeError, match="cuda backend runs CUDA tensors"):
        lookup(torch.randn(4, 8), torch.randn(3, 8), backend="cuda")


def test_auto_takes_the_fast_backend_on_cpu(monkeypatch):
    """A working native kernel must be what "auto" runs on CPU tensors; no silent fallback."""
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    require_backend("native", "cpu")
    lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "native"
    assert dispatch.available_backends("cpu")[0] == "native"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("VQDNA_BACKEND", "reference")
    lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "reference"
    monkeypatch.setenv("VQDNA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run here"):
        lookup(torch.randn(10, 8), torch.randn(4, 8))


def test_backend_is_logged(caplog):
    with caplog.at_level("DEBUG", logger="vqdna.kernels"):
        lookup(torch.randn(10, 8), torch.randn(4, 8), backend="reference")
    assert "lookup: backend=reference" in caplog.text


def test_reference_chunks_large_n(monkeypatch, rng):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 64)
    z, e = torch.randn(100, 6, generator=rng), torch.randn(10, 6, generator=rng)
    codes, dist = reference.lookup(z, e)
    assert torch.equal(codes.long(), torch.cdist(z.double(), e.double()).argmin(1))


@pytest.mark.parametrize("backend,device", backend_params("lookup"))
def test_opcheck(backend, device, rng):
    """torch.library's own checks of the registered op (schema, fake impl, dispatch)."""
    require_backend(backend, device)
    from vqdna.kernels.ops.registry import backend_op

    op = backend_op("lookup", backend)
    z = torch.randn(33, 20, generator=rng).to(device)
    e = torch.randn(70, 20, generator=rng).to(device)
    sq = e.pow(2).sum(-1)
    tests = ("test_schema", "test_faketensor")
    if not (backend == "triton" and device == "cpu"):
        tests = tests + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, (z, e, sq), test_utils=tests)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_torch_compile_fullgraph(backend, rng):
    require_backend(backend, "cpu")
    z, e = torch.randn(40, 12, generator=rng), torch.randn(9, 12, generator=rng)

    def f(z, e):
        codes, dist = lookup(z, e, backend=backend)
        return e[codes.long()] + dist[:, None]

    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(z, e), f(z, e))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("which", ["z", "codebook", "both"])
def test_cuda_misaligned_inputs_take_the_scalar_path(dtype, which, rng, poison):
    """D % 8 == 0 but a pointer off a 16-byte boundary: the CUDA kernel stages its tiles with
    element-wise loads (16-byte cp.async would fault) and returns exactly what the aligned call does."""
    require_backend("cuda", "cuda")
    from tests.conftest import misaligned
    from vqdna.kernels.cuda_launch import mma_vec_loads

    n, k, d = 1000, 513, 64
    z, cb = make_inputs(n, k, d, dtype, "cuda", rng)
    zm = misaligned(z) if which in ("z", "both") else z
    cbm = misaligned(cb) if which in ("codebook", "both") else cb
    assert not mma_vec_loads(dtype, d, zm.data_ptr() % 16 == 0 and cbm.data_ptr() % 16 == 0)
    codes, dist = lookup(zm, cbm, backend="cuda")
    want_codes, want_dist = lookup(z, cb, backend="cuda")
    assert torch.equal(codes, want_codes) and torch.equal(dist, want_dist)
    assert_lookup_matches(z, cb, codes, dist, dtype)


# ---- the native backend's bf16-screened search (csrc/common/cpu_bf16_screen.h) -----------------------
# A bfloat16 pass and an exact float32 re-check of the codes it cannot rule out: the codes and dist must
# be bit-identical to the exact float32 search. VQDNA_NATIVE_SEARCH forces either.

from vqdna import _ext  # noqa: E402

requires_screen = pytest.mark.skipif(
    not _ext.bf16_screen_supported(),
    reason="the bf16-screened native search needs a CPU with AVX512_BF16 (and vqdna._C built for x86-64)",
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (NaN payloads included), for bit-identity checks."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


def exact_and_screened(fn, monkeypatch):
    """fn() under VQDNA_NATIVE_SEARCH=exact, then =bf16; returns (exact, screened, stats of the latter)."""
    monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "exact")
    want = fn()
    assert _ext.native_search_stats()["search"] == "exact"
    monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "bf16")
    got = fn()
    return want, got, _ext.native_search_stats()


def assert_bit_identical(want, got):
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.dtype == g.dtype and w.shape == g.shape, f"output {i}: {g.dtype} {g.shape} != {w.dtype} {w.shape}"
        diff = bits(w) != bits(g)
        assert not bool(diff.any()), (
            f"output {i}: {int(diff.sum())} elements differ from the exact search; first at "
            f"{diff.nonzero()[0].tolist()}: {g[diff][0].item()} != {w[diff][0].item()}"
        )


def near_tie_inputs(kind: str, n: int, d: int, dtype, gen, scale: float = 1.0):
    """Inputs on which the bf16 screen ranks codes wrongly or cannot separate them. `kind`:
    "rounding": families of codes around a bf16-exact vector v in [1, 2)^d, each coordinate just below
      (rounds down to v) or just above (rounds up) a bf16 rounding midpoint, with rows z = v: every
      rounding error of a code has the same sign, the screen prefers the codes that round up, the exact
      search those below (distances 2^-10 steps apart, all float16-exact);
    "ulp": 20 copies of one code, each with one coordinate moved by one float32 ulp (identical in bf16),
      among random codes, rows near them;
    "duplicates": each code three times (exact ties, lowest index wins) and one code 40 times (more than
      the screen keeps per row: the exact search takes those rows).
    `scale` multiplies everything (a power of two: exact)."""
    if kind == "rounding":
        fams = 6
        v = (torch.randint(128, 255, (fams, d), generator=gen).double() / 128)  # bf16-exact, in [1, 2)
        mid = v + 2.0**-8
        below = mid[:, None] - 2.0**-10 * torch.randint(1, 4, (fams, 4, d), generator=gen).double()
        above = mid[:, None] + 2.0**-10 * torch.randint(1, 4, (fams, 4, d), generator=gen).double()
        codebook = torch.cat([below, above], 1).reshape(-1, d)
        codebook = codebook[torch.randperm(codebook.shape[0], generator=gen)]
        z = v[torch.randint(fams, (n,), generator=gen)]
    elif kind == "ulp":
        e = torch.randn(d, generator=gen)
        variants = e.repeat(20, 1)
        for j in range(20):
            variants[j, j % d] = torch.nextafter(variants[j, j % d], torch.tensor(math.inf))
        codebook = torch.cat([torch.randn(60, d, generator=gen), variants, torch.randn(50, d, generator=gen)]).double()
        z = (e + 0.01 * torch.randn(n, d, generator=gen)).double()
    elif kind == "duplicates":
        base = torch.randn(50, d, generator=gen)
        codebook = torch.cat([base, base, base, base[7:8].repeat(40, 1)]).double()
        z = (base[torch.randint(50, (n,), generator=gen)] + 0.05 * torch.randn(n, d, generator=gen)).double()
        z[: n // 4] = base[7].double()  # rows on the 40-fold code
    else:
        raise ValueError(kind)
    return (z * scale).to(dtype), (codebook * scale).to(dtype)


@requires_screen
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (1, 300, 64), (7, 1, 17), (130, 513, 33), (64, 4096, 130), (200, 64, 384)])
def test_native_screened_search_is_bit_identical(n, k, d, dtype, rng, monkeypatch, poison):
    """Random inputs (make_inputs: rows near codes and noise at random scales): one row, one code, D odd
    and not a multiple of 16, large K."""
    z, codebook = make_inputs(n, k, d, dtype, "cpu", rng)
    want, got, stats = exact_and_screened(lambda: lookup(z, codebook, backend="native"), monkeypatch)
    assert stats["search"] == "bf16" and stats["rows_screened"] + stats["rows_exact"] == n
    assert stats["rows_screened"] > 0, stats
    assert_bit_identical(want, got)


@requires_screen
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("kind,d,scale", [("rounding", 64, 1.0), ("rounding", 33, 2.0**40), ("rounding", 130, 2.0**-40),
                                          ("rounding", 48, 2.0**-64), ("ulp", 40, 1.0), ("duplicates", 70, 1.0)])
def test_native_screened_search_near_ties(kind, d, scale, dtype, rng, monkeypatch, poison):
    """Near-ties built against the screen (near_tie_inputs), at scales where the bound's absolute
    (denormal) terms matter too: the exact re-check and its fallbacks give the exact search's bits."""
    if dtype == torch.float16 and scale != 1.0:
        pytest.skip("float16 cannot hold this scale (it overflows or flushes to zero)")
    z, codebook = near_tie_inputs(kind, 90, d, dtype, rng, scale)
    want, got, stats = exact_and_screened(lambda: lookup(z, codebook, backend="native"), monkeypatch)
    assert stats["search"] == "bf16"
    assert_bit_identical(want, got)
    if kind == "rounding" and dtype != torch.bfloat16:
        # The screen ranks the codes that round up first; the answer is a code below the midpoints.
        offsets = codebook[got[0].long()].double() - z.double()
        assert bool((offsets < 2.0**-8 * scale).all())
        # At 2^-64 the products are float32 denormals, which the instruction flushes: the bound's absolute
        # term keeps every code, the candidate lists overflow and the exact search takes the rows.
        assert stats["rows_screened"] > 0 if scale > 2.0**-64 else stats["rows_exact"] == z.shape[0]
    if kind == "duplicates":
        assert stats["rows_exact"] >= z.shape[0] // 4  # the 40-fold code overflows the candidate list
        assert torch.equal(got[0][: z.shape[0] // 4], torch.full((z.shape[0] // 4,), 7, dtype=torch.int32))


@requires_screen
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_native_screened_search_nonfinite(dtype, rng, monkeypatch, poison):
    """Non-finite rows, a finite row too large to bound, and a non-finite codebook: as the exact search."""
    n, k, d = 40, 200, 70
    z, codebook = make_inputs(n, k, d, dtype, "cpu", rng)
    z[3, 5] = math.nan
    z[10, 0] = math.inf
    z[11] = -math.inf
    z[20, :] = 6e4 if dtype == torch.float16 else 1e30  # ||z||^2 overflows float32 (float16: its max)
    want, got, stats = exact_and_screened(lambda: lookup(z, codebook, backend="native"), monkeypatch)
    assert_bit_identical(want, got)
    assert stats["search"] == "bf16" and stats["rows_exact"] >= 4 and stats["rows_screened"] > 0
    codebook[7, 2] = math.nan
    want, got, stats = exact_and_screened(lambda: lookup(z, codebook, backend="native"), monkeypatch)
    assert_bit_identical(want, got)
    assert stats["search"] == "exact"  # a non-finite codebook is never screened


@requires_screen
def test_native_screened_search_channel_first(rng, monkeypatch, poison):
    z = torch.randn(2, 96, 150, generator=rng).movedim(1, -1)  # read in place, column-major
    codebook = torch.randn(300, 96, generator=rng)
    want, got, _ = exact_and_screened(lambda: lookup(z, codebook, backend="native"), monkeypatch)
    assert_bit_identical(want, got)


@requires_screen
def test_native_auto_runs_the_screen(rng, monkeypatch):
    """On this CPU (AVX512_BF16) the default search of a large enough problem is the screened one."""
    monkeypatch.delenv("VQDNA_NATIVE_SEARCH", raising=False)
    z, codebook = torch.randn(256, 384, generator=rng), torch.randn(512, 384, generator=rng)
    lookup(z, codebook, backend="native")
    stats = _ext.native_search_stats()
    assert stats["search"] == "bf16" and stats["rows_screened"] == 256, stats
    assert stats["candidates"] < 8 * 256, stats  # the screen rules out nearly every code
    lookup(z[:, :32], codebook[:, :32], backend="native")  # small D: the exact search pays
    assert _ext.native_search_stats()["search"] == "exact"


@requires_screen
def test_native_auto_stops_screening_where_it_does_not_pay(rng, monkeypatch):
    """Near-equidistant codes (as EMA-trained cluster means become) leave many candidates per row: "auto"
    searches the remaining blocks exactly (no slower than the exact search), with the same bits."""
    base = torch.randn(384, generator=rng)
    codebook = base + 0.02 * torch.randn(512, 384, generator=rng)
    z = base + torch.randn(1200, 384, generator=rng)
    monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "exact")
    want = lookup(z, codebook, backend="native")
    monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "auto")
    got = lookup(z, codebook, backend="native")
    stats = _ext.native_search_stats()
    assert stats["search"] == "bf16" and stats["rows_exact"] > z.shape[0] // 2, stats
    assert_bit_identical(want, got)


def test_native_search_env_is_checked(rng, monkeypatch):
    require_backend("native", "cpu")
    monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "fast")
    with pytest.raises(RuntimeError, match="VQDNA_NATIVE_SEARCH=fast is not one of auto, exact, bf16"):
        lookup(torch.randn(4, 8, generator=rng), torch.randn(3, 8, generator=rng), backend="native")
    if not _ext.bf16_screen_supported():
        monkeypatch.setenv("VQDNA_NATIVE_SEARCH", "bf16")
        with pytest.raises(RuntimeError, match="no AVX512_BF16"):
            lookup(torch.randn(4, 8, generator=rng), torch.randn(3, 8, generator=rng), backend="native")
