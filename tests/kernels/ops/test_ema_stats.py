"""ema_stats / ema_update: every backend against the reference (docs/design.md §2.3)."""

import pytest
import torch

from tests.conftest import backend_case_params, backend_params, require_backend
from vqdna.kernels import dispatch, ema_stats, ema_update, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0, 5, 3), (1, 1, 1), (7, 3, 2), (100, 17, 64), (1000, 64, 513), (4099, 384, 512)]
# (backend, device, dtype, *shape); the Triton interpreter (~1 ms per tile step) runs the large ones under `slow`.
CASES = backend_case_params(
    [(t, *s) for t in DTYPES for s in SHAPES], lambda t, n, d, k: n * d > 100_000, op="ema_stats"
)


def reference_stats(x, codes, k, mask=None, prev_codes=None, prev_codebook=None):
    vectors = x.double()
    if prev_codes is not None:
        vectors = 2 * vectors - prev_codebook.double()[prev_codes.long()]
    n, s, _ = reference.ema_update(
        vectors, codes, torch.zeros(k, dtype=torch.float64), torch.zeros(k, x.shape[1], dtype=torch.float64),
        decay=0.0, eps=0.0, mask=mask,
    )
    return n, s


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("backend,device,dtype,n,d,k", CASES)
def test_ema_stats_match_reference(backend, device, dtype, n, d, k, deterministic, rng, poison):
    require_backend(backend, device, "ema_stats")
    x = torch.randn(n, d, generator=rng).to(dtype)
    # Skewed code frequencies: repeated codes and empty clusters both occur.
    codes = (torch.rand(n, generator=rng).pow(3) * k).long().clamp_max(k - 1).to(torch.int32)
    mask = torch.rand(n, generator=rng) < 0.8
    for use_mask in (False, True):
        m = mask if use_mask else None
        counts, sums = ema_stats(x.to(device), codes.to(device), k, mask=None if m is None else m.to(device),
                                 deterministic=deterministic, backend=backend)
        assert dispatch.last_backend("ema_stats") == backend
        ref_n, ref_s = reference_stats(x, codes, k, m)
        assert counts.dtype == torch.float32 and sums.dtype == torch.float32 and sums.shape == (k, d)
        assert torch.equal(counts.cpu().double(), ref_n)
        scale = torch.zeros(k, dtype=torch.float64).index_add_(0, codes.long(), x.double().abs().sum(-1) / max(d, 1))
        assert torch.allclose(sums.cpu().double(), ref_s, rtol=1e-5, atol=1e-5 * float(scale.max().clamp_min(1)))


@pytest.mark.parametrize("backend,device", backend_params("ema_stats"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_ema_stats_with_previous_level(backend, device, dtype, rng, poison):
    """HRQ's H_l = 2 Z_l - C_{l-1}[M_{l-1}] recomputed inside the reduction."""
    require_backend(backend, device, "ema_stats")
    n, d, k, kp = 300, 24, 40, 9
    z = torch.randn(n, d, generator=rng).to(dtype)
    prev_codebook = torch.randn(kp, d, generator=rng).to(dtype)
    prev_codes = torch.randint(kp, (n,), generator=rng, dtype=torch.int32)
    codes = torch.randint(k, (n,), generator=rng, dtype=torch.int32)
    counts, sums = ema_stats(z.to(device), codes.to(device), k, prev_codes=prev_codes.to(device),
                             prev_codebook=prev_codebook.to(device), backend=backend)
    ref_n, ref_s = reference_stats(z, codes, k, prev_codes=prev_codes, prev_codebook=prev_codebook)
    assert torch.equal(counts.cpu().double(), ref_n)
    assert torch.allclose(sums.cpu().double(), ref_s, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params("ema_stats"))
def test_deterministic_mode_is_bitwise_repeatable(backend, device, rng):
    require_backend(backend, device, "ema_stats")
    n, d, k = 2000, 33, 7  # few codes: many rows collide on each
    x = torch.randn(n, d, generator=rng).to(device)
    codes = torch.randint(k, (n,), generator=rng, dtype=torch.int32).to(device)
    first = ema_stats(x, codes, k, deterministic=True, backend=backend)
    for _ in range(3):
        again = ema_stats(x, codes, k, deterministic=True, backend=backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_deterministic_default_follows_torch(monkeypatch, rng):
    seen = []
    from vqdna.kernels.ops.ema_stats import wrapper

    real = wrapper.backend_op

    def spy(op_name, backend):
        op = real(op_name, backend)
        return lambda *a: seen.append(a[-1]) or op(*a)

    monkeypatch.setattr(wrapper, "backend_op", spy)
    x, codes = torch.randn(10, 4, generator=rng), torch.zeros(10, dtype=torch.int32)
    ema_stats(x, codes, 3)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        ema_stats(x, codes, 3)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [False, True]


def test_ema_update_one_step_by_hand():
    """docs/design.md §2.3 computed by hand for K=2, D=1, decay 0.5, eps 0.1."""
    x = torch.tensor([[1.0], [3.0], [10.0]])
    codes = torch.tensor([0, 0, 1])
    cluster_size = torch.tensor([2.0, 0.0])
    embed_sum = torch.tensor([[4.0], [0.0]])
    codebook = torch.zeros(2, 1)
    ema_update(x, codes, cluster_size, embed_sum, codebook, decay=0.5, eps=0.1)
    # N = 0.5*[2, 0] + 0.5*[2, 1] = [2, 0.5]; S = 0.5*[4, 0] + 0.5*[4, 10] = [4, 5]
    assert torch.allclose(cluster_size, torch.tensor([2.0, 0.5]))
    assert torch.allclose(embed_sum, torch.tensor([[4.0], [5.0]]))
    total = 2.5
    smoothed = (torch.tensor([2.0, 0.5]) + 0.1) / (total + 2 * 0.1) * total
    assert torch.allclose(codebook[:, 0], torch.tensor([4.0, 5.0]) / smoothed)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("n", [100, 600])  # Triton: the direct (atomic) and the sorted paths
@pytest.mark.parametrize("backend,device", backend_params("ema_stats"))
def test_ema_update_matches_reference_state(backend, device, n, deterministic, rng):
    """Two EMA steps of HRQ level 1 (vectors 2 Z - C_prev[M_prev]) with K = 12, skewed counts, codes
    that no row uses (K * eps of Laplace smoothing matters), eps = 0.1 and padding rows."""
    require_backend(backend, device, "ema_stats")
    d, k, kp, decay, eps = 16, 12, 5, 0.9, 0.1
    cs = torch.rand(k, generator=rng) * 3
    cs[[2, 7]] = 0.0  # dead in the state too
    es = torch.randn(k, d, generator=rng)
    state = [cs.to(device), es.to(device), torch.empty(k, d).to(device)]
    prev_codebook = torch.randn(kp, d, generator=rng)
    for _ in range(2):
        z = torch.randn(n, d, generator=rng)
        prev_codes = torch.randint(kp, (n,), generator=rng, dtype=torch.int32)
        # Skewed: code 0 takes ~half the rows; codes 7..11 none.
        codes = (torch.rand(n, generator=rng).pow(3) * 7).long().to(torch.int32)
        mask = torch.rand(n, generator=rng) < 0.8
        vectors = 2.0 * z - prev_codebook[prev_codes.long()]
        cs, es, cb = reference.ema_update(vectors, codes, cs, es, decay=decay, eps=eps, mask=mask)
        ema_update(z.to(device), codes.to(device), *state, decay=decay, eps=eps, mask=mask.to(device),
                   prev_codes=prev_codes.to(device), prev_codebook=prev_codebook.to(device),
                   deterministic=deterministic, backend=backend)
        assert dispatch.last_backend("ema_stats") == backend
        for name, got, want in zip(("cluster_size", "embed_sum", "codebook"), state, (cs, es, cb)):
            assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("mask_shape", ["rows", "rows_heads", None])
@pytest.mark.parametrize("backend,device", backend_params("ema_stats"))
def test_ema_update_per_head_codebooks_in_one_call(backend, device, mask_shape, rng):
    """State [C, K] / [C, K, D], x [..., C, D], codes [..., C]: the reference's single-codebook update
    of each codebook on its head's rows, each smoothed on its own (codebooks with unequal totals, so a
    smoothing over all C * K codes would differ)."""
    require_backend(backend, device, "ema_stats")
    c, k, d, decay, eps = 3, 10, 6, 0.9, 0.5
    cs = torch.rand(c, k, generator=rng) * torch.tensor([[1.0], [5.0], [20.0]])
    es = torch.randn(c, k, d, generator=rng)
    state = [cs.to(device), es.to(device), torch.empty(c, k, d).to(device)]
    want = [list(t) for t in zip(cs, es)]
    for _ in range(2):
        x = torch.randn(4, 30, c, d, generator=rng)
        codes = torch.randint(k - 2, (4, 30, c), generator=rng)  # the last two codes of each unused
        rows = torch.rand(4, 30, generator=rng) < 0.7
        mask = {"rows": rows, "rows_heads": rows[..., None].expand(4, 30, c), None: None}[mask_shape]
        for h in range(c):
            want[h] = reference.ema_update(x[..., h, :].reshape(-1, d), codes[..., h].reshape(-1), *want[h][:2],
                                           decay=decay, eps=eps, mask=None if mask is None else rows.reshape(-1))
        ema_update(x.to(device), codes.to(device), *state, decay=decay, eps=eps,
                   mask=None if mask is None else mask.to(device), backend=backend)
        for i, name in enumerate(("cluster_size", "embed_sum", "codebook")):
            expected = torch.stack([w[i] for w in want])
            assert torch.allclose(state[i].cpu(), expected, rtol=1e-5, atol=1e-5), name


def test_ema_update_per_head_shapes_are_checked():
    with pytest.raises(ValueError, match=r"cluster_size \(2, 5\) holds 2 codebooks: need x \[\.\.\., 2, D\]"):
        ema_update(torch.randn(7, 3, 4), torch.zeros(7, 3, dtype=torch.long), torch.ones(2, 5), torch.ones(2, 5, 4),
                   torch.ones(2, 5, 4))


@pytest.mark.parametrize("backend,device", backend_params("ema_stats"))
def test_ema_stats_opcheck(backend, device, rng):
    require_backend(backend, device, "ema_stats")
    from vqdna.kernels.ops.registry import backend_op

    x = torch.randn(30, 5, generator=rng).to(device)
    codes = torch.randint(4, (30,), generator=rng, dtype=torch.int32).to(device)
    mask = (torch.rand(30, generator=rng) < 0.5).to(device)
    tests = ("test_schema", "test_faketensor")
    if not (backend == "triton" and device == "cpu"):
        tests = tests + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(backend_op("ema_stats", backend), (x, codes, mask, None, None, 4, True), test_utils=tests)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("d", [384, 383], ids=["vector", "scalar"])
def test_cuda_large_codebook_global_atomics(dtype, d, rng):
    """K = 65536: no per-block shared table fits, so the fast mode adds each run of rows with global
    atomics (16-byte float4 atomics on sm_90 when D % V == 0), with a mask and with HRQ's previous level."""
    require_backend("cuda", "cuda", "ema_stats")
    from vqdna.kernels.cuda_launch import ema_atomic_plan, smem_limits

    n, k, kp = 20000, 65536, 50
    optin, per_sm = smem_limits(torch.cuda.current_device())
    plan = ema_atomic_plan(d, k, dtype, per_sm, optin)
    assert not plan.smem_table and plan.vec == (d == 384)
    x = torch.randn(n, d, generator=rng).to(dtype)
    codes = (torch.rand(n, generator=rng).pow(3) * k).long().clamp_max(k - 1).to(torch.int32)
    mask = torch.rand(n, generator=rng) < 0.8
    prev_codebook = torch.randn(kp, d, generator=rng).to(dtype)
    prev_codes = torch.randint(kp, (n,), generator=rng, dtype=torch.int32)
    for prev in (False, True):
        extra = dict(prev_codes=prev_codes, prev_codebook=prev_codebook) if prev else {}
        counts, sums = ema_stats(x.cuda(), codes.cuda(), k, mask=mask.cuda(), deterministic=False, backend="cuda",
                                 **{name: t.cuda() for name, t in extra.items()})
        assert dispatch.last_backend("ema_stats") == "cuda"
        ref_n, ref_s = reference_stats(x, codes, k, mask, **extra)
        assert torch.equal(counts.cpu().double(), ref_n)
        vectors = 2 * x.double() - prev_codebook.double()[prev_codes.long()] if prev else x.double()
        scale = torch.zeros(k, dtype=torch.float64).index_add_(0, codes.long(), vectors.abs().sum(-1) / d)
        assert torch.allclose(sums.cpu().double(), ref_s, rtol=1e-5, atol=1e-5 * float(scale.max().clamp_min(1)))
