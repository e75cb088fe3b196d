"""sample_codes: Gumbel-max sampling. The torch-stream backends (native, reference) draw torch's uniform_
from the default generator (reference.sample_codes): the native kernel draws from the generator's engine
itself, the same numbers (hence the same codes) and the same generator state afterwards as the reference's
torch ops. The Philox backends (triton) draw counter-based noise keyed by a seed the wrapper draws from
the generator (reference.sample_codes_philox): the backend-parametrised tests hold each backend to its spec."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, lookup, reference, sample_codes
from vqdna.kernels.ops.registry import backend_op
from vqdna.kernels.ops.sample_codes.declaration import PHILOX_BACKENDS
from vqdna.kernels.ops.sample_codes.wrapper import philox_seed
from tests.conftest import backend_params, require_backend


def _inputs(n, k, d, rng, scale=1.0):
    return torch.randn(n, d, generator=rng) * scale, torch.randn(k, d, generator=rng) * scale


def _spec(backend, z, codebook, temp, cosine=False, block_rows=4096):
    """What `backend` returns for a call made in the generator state this is called in (and the state
    it leaves): the torch-stream spec, or the Philox spec with the seed the wrapper draws."""
    if backend in PHILOX_BACKENDS:
        return reference.sample_codes_philox(z, codebook, temp, cosine, philox_seed(z.device))
    return reference.sample_codes(z, codebook, temp, cosine, block_rows)


def _assert_codes(got, want, backend, scores_of):
    """Identical codes; only a Philox backend on a GPU (approximate log and sqrt) may pick the other code
    of a near-tie: then the spec scores (scores_of() [N, K]) of the two are within 1e-5 (relative)."""
    bad = got.cpu() != want.cpu()
    if bad.any() and backend in PHILOX_BACKENDS and got.device.type == "cuda":
        s = scores_of()[bad].double()
        gap = (s.gather(1, got.cpu()[bad, None]) - s.gather(1, want.cpu()[bad, None])).abs()
        bad[bad.clone()] = (gap > 1e-5 * (1 + s.abs().amax(1, keepdim=True))).squeeze(1)
    assert not bad.any(), f"codes differ at rows {bad.nonzero()[:5].flatten().tolist()}"


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
@pytest.mark.parametrize("n,k,d,block_rows", [(1, 1, 1, 4096), (50, 37, 6, 7), (300, 64, 19, 4096), (129, 5, 3, 128)])
def test_codes_and_generator_state_match_the_spec(backend, device, cosine, n, k, d, block_rows, rng, poison):
    """Same seed: the spec's codes, and the generator where the spec leaves it (the next draw agrees).
    K not a multiple of 8 (the vector tail), blocks not dividing N, a NaN row (the torch stream: torch's
    argmin, index 0; Philox: code 0, a NaN score never wins)."""
    require_backend(backend, device, "sample_codes")
    z, codebook = _inputs(n, k, d, rng, scale=0.5)
    if n > 3:
        z[3, 1] = math.nan
    torch.manual_seed(123)
    got, quantized, dist = sample_codes(z.to(device), codebook.to(device), 0.7, cosine=cosine, block_rows=block_rows,
                                        backend=backend)
    assert dispatch.last_backend("sample_codes") == backend
    state = torch.get_rng_state()
    after = torch.rand(4, device=device)
    torch.manual_seed(123)
    want, _, _ = _spec(backend, z.to(device), codebook.to(device), 0.7, cosine, block_rows)
    assert device != "cpu" or torch.equal(torch.get_rng_state(), state), "the CPU generator's state differs"
    assert torch.equal(after, torch.rand(4, device=device)), "the generator is not where the spec leaves it"
    assert got.dtype == torch.int64 and got.shape == (n,)

    def scores():
        torch.manual_seed(123)
        return reference.philox_scores(z.to(device), codebook.to(device), 0.7, cosine, philox_seed(torch.device(device))).cpu()

    _assert_codes(got, want, backend, scores)
    # The chosen rows bit-exact, and their squared distances (float32 sums in another order).
    assert quantized.dtype == dist.dtype == torch.float32 and quantized.shape == (n, d) and dist.shape == (n,)
    assert torch.equal(quantized.cpu(), codebook[got.cpu()])
    want_dist = (z.double() - codebook.double()[got.cpu()]).pow(2).sum(-1)
    finite = torch.isfinite(z).all(-1)
    torch.testing.assert_close(dist.cpu()[finite].double(), want_dist[finite], rtol=1e-5, atol=1e-6)
    assert not bool(torch.isfinite(dist.cpu()[~finite]).any())


def _uniforms(backend, n, k, device):
    """The uniforms [N, K] the spec of `backend` draws in the generator state this is called in."""
    if backend in PHILOX_BACKENDS:
        offsets = torch.arange(n * k, device=device).view(n, k)
        return reference.philox_uniform(philox_seed(torch.device(device)), offsets)
    return torch.rand(n, k, device=device)


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_draws_are_the_specs_uniforms(backend, device):
    """z = 0 and one code repeated: every distance is equal, so the code is the argmax of the row's
    uniforms: those of torch.rand(N, K) (torch stream) or of tl.rand(seed, i K + k) (Philox) under the
    same seed, element for element."""
    require_backend(backend, device, "sample_codes")
    n, k = (500, 300) if not (backend == "triton" and device == "cpu") else (40, 70)  # the interpreter is slow
    codebook = torch.ones(1, 4).expand(k, 4).contiguous().to(device)
    torch.manual_seed(5)
    got = sample_codes(torch.zeros(n, 4, device=device), codebook, 1.0, block_rows=64, backend=backend)[0]
    torch.manual_seed(5)
    u = _uniforms(backend, n, k, device)
    assert torch.equal(got, u.argmax(-1))
    torch.manual_seed(5)
    got = sample_codes(torch.zeros(n, 4, device=device), codebook, 1.0, cosine=True, backend=backend)[0]
    assert torch.equal(got, u.argmax(-1))


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_strided_rows_and_bad_input(backend, device, rng):
    require_backend(backend, device, "sample_codes")
    z, codebook = _inputs(40, 20, 8, rng)
    z, codebook = z.to(device), codebook.to(device)
    heads = z.reshape(20, 2, 8).transpose(0, 1)  # [2, 20, 8]: rows with stride 16, as VectorQuantizer's heads
    torch.manual_seed(1)
    got = sample_codes(heads[1], codebook, 0.5, backend=backend)
    torch.manual_seed(1)
    want = _spec(backend, heads[1].contiguous(), codebook, 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    empty = sample_codes(z[:0], codebook, 0.5, backend=backend)
    assert empty[0].shape == (0,) and empty[1].shape == (0, 8) and empty[2].shape == (0,)
    with pytest.raises(ValueError, match="temp must be > 0"):
        sample_codes(z, codebook, 0.0, backend=backend)
    with pytest.raises(TypeError, match="float32"):
        sample_codes(z.double(), codebook.double(), 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"need z \[N, D\]"):
        sample_codes(z, codebook[:, :4], 0.5, backend=backend)


def test_native_opcheck(rng):
    """Schema and fake of the native op (the tests that compare two runs do not apply: each call draws)."""
    require_backend("native", "cpu", "sample_codes")
    z, codebook = _inputs(30, 12, 5, rng)
    torch.library.opcheck(backend_op("sample_codes", "native"), (z, codebook, 0.5, False, 7),
                          test_utils=("test_schema", "test_faketensor"))


# -- the Philox spec (reference.sample_codes_philox) and the Triton backend held to it ------------------


def test_philox_spec_samples_softmax_of_the_logits():
    """Gumbel-max: the codes of identical rows follow softmax(logits) (chi-square over K = 5, 20000 rows,
    df = 4: p = 1e-4 at 23.5; the threshold 30 is looser still). z = 0 and codes at distances r_k: the
    logits are -r_k / temp; with cosine, unit codes at cos c_k to a unit z: c_k / temp."""
    n, temp = 20000, 0.7
    seed = torch.tensor([20260417], dtype=torch.int64)
    r = torch.tensor([0.3, 0.5, 0.6, 0.9, 1.4])
    codebook = torch.zeros(5, 3)
    codebook[:, 0] = r
    c = torch.tensor([0.9, 0.5, 0.1, -0.4, 0.7])
    unit = torch.stack([c, (1 - c * c).sqrt(), torch.zeros(5)], 1)
    z_unit = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    for z, book, logits, cosine in ((torch.zeros(n, 3), codebook, -r / temp, False), (z_unit, unit, c / temp, True)):
        codes = reference.sample_codes_philox(z, book, temp, cosine, seed)[0]
        observed = torch.bincount(codes, minlength=5).double()
        expected = n * torch.softmax(logits.double(), 0)
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert chi2 < 30.0, f"cosine={cosine}: chi-square {chi2:.1f}: observed {observed.tolist()}, expected {expected.tolist()}"


def test_philox_spec_at_tiny_temperature_is_the_nearest_code(rng):
    """temp -> 0: the logits' gaps dwarf the noise (|log(-log u)| < 47): the nearest code (lookup), or the
    largest z.e with cosine."""
    z, codebook = _inputs(300, 40, 8, rng)
    seed = torch.tensor([7], dtype=torch.int64)
    nearest = lookup(z, codebook, backend="reference")[0].long()
    assert torch.equal(reference.sample_codes_philox(z, codebook, 1e-6, False, seed)[0], nearest)
    cos_best = (z @ codebook.T).argmax(-1)
    assert torch.equal(reference.sample_codes_philox(z, codebook, 1e-6, True, seed)[0], cos_best)
    # and at temp 1 the noise matters: some code is not the nearest
    assert not torch.equal(reference.sample_codes_philox(z, codebook, 1.0, False, seed)[0], nearest)


def test_philox_uniform_is_counter_based():
    """Each counter's value depends on (seed, counter) only: any split of the counters draws the same
    numbers; another seed other numbers; 64-bit counters use their high word; the values lie in [0, 1)."""
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    offsets = torch.arange(1000)
    whole = reference.philox_uniform(seed, offsets)
    assert torch.equal(torch.cat([reference.philox_uniform(seed, offsets[i : i + 7]) for i in range(0, 1000, 7)]), whole)
    assert torch.equal(reference.philox_uniform(seed, offsets.flip(0)), whole.flip(0))
    assert not torch.equal(reference.philox_uniform(seed + 1, offsets), whole)
    assert not torch.equal(reference.philox_uniform(seed, offsets + (1 << 32)), whole)
    assert whole.dtype == torch.float32 and 0 <= float(whole.min()) and float(whole.max()) < 1
    assert abs(float(whole.mean()) - 0.5) < 0.05


@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (1, 70, 19), (33, 1, 5), (45, 130, 40), (20, 300, 64)])
def test_triton_matches_the_philox_spec(cosine, n, k, d, rng, poison):
    """The fused kernel against reference.sample_codes_philox with the same seed (under the interpreter:
    16 x 32 tiles, so several row and code tiles, partial ones, D not a multiple of 16 or of the 32-wide
    chunks): codes identical, quantized exact, dist within lookup's tolerance; every output written."""
    require_backend("triton", "cpu", "sample_codes")
    z, codebook = _inputs(n, k, d, rng)
    seed = torch.tensor([-(1 << 40) + 3], dtype=torch.int64)
    got = backend_op("sample_codes", "triton")(z, codebook, 0.3, cosine, 4096, seed)
    want = reference.sample_codes_philox(z, codebook, 0.3, cosine, seed)
    assert torch.equal(got[0], want[0]), f"codes differ at rows {(got[0] != want[0]).nonzero()[:5].flatten().tolist()}"
    assert torch.equal(got[1], codebook[want[0]])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    # the seed is the only source: the same seed draws the same codes, another seed others
    assert torch.equal(backend_op("sample_codes", "triton")(z, codebook, 0.3, cosine, 4096, seed)[0], got[0])
    if k > 1 and n > 1:
        assert not torch.equal(backend_op("sample_codes", "triton")(z, codebook, 0.3, cosine, 4096, seed + 1)[0], got[0])


def test_triton_ties_and_nonfinite_rows(rng, poison):
    """Duplicated codes (equal distances: the noise decides, as in the spec), a NaN row and an Inf row
    (dist non-finite; their codes are unspecified), the other rows exactly the spec's."""
    require_backend("triton", "cpu", "sample_codes")
    z, codebook = _inputs(40, 10, 6, rng)
    codebook = torch.cat([codebook, codebook, codebook[:3]])  # K = 23, each code up to three times
    z[5] = codebook[2]  # at distance 0 from three codes
    z[7, 2], z[11, 0] = math.nan, math.inf
    seed = torch.tensor([99], dtype=torch.int64)
    for cosine in (False, True):
        got = backend_op("sample_codes", "triton")(z, codebook, 0.5, cosine, 4096, seed)
        want = reference.sample_codes_philox(z, codebook, 0.5, cosine, seed)
        finite = torch.isfinite(z).all(-1)
        assert torch.equal(got[0][finite], want[0][finite])
        assert torch.equal(got[1], codebook[got[0]])
        assert not bool(torch.isfinite(got[2][~finite]).any())
        torch.testing.assert_close(got[2][finite], want[2][finite], rtol=1e-5, atol=1e-5)
        assert ((got[0] >= 0) & (got[0] < 23)).all()


def test_triton_seed_comes_from_the_generator(rng):
    """Through the wrapper: torch.manual_seed reproduces a call, successive calls draw different codes,
    the seed is required by the op, and 'auto' keeps the peer's draws on the CPU (native)."""
    require_backend("triton", "cpu", "sample_codes")
    z, codebook = _inputs(30, 24, 5, rng)
    torch.manual_seed(11)
    a = sample_codes(z, codebook, 1.0, backend="triton")[0]
    b = sample_codes(z, codebook, 1.0, backend="triton")[0]
    torch.manual_seed(11)
    assert torch.equal(sample_codes(z, codebook, 1.0, backend="triton")[0], a)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        backend_op("sample_codes", "triton")(z, codebook, 1.0, False, 4096, None)
    sample_codes(z, codebook, 1.0)
    assert dispatch.last_backend("sample_codes") == "native"


def test_auto_takes_triton_on_cuda_and_native_on_the_cpu():
    """The default order: Triton first on CUDA (the fused kernel; the torch ops' reference is still
    selectable), native on the CPU (the peer's exact draws)."""
    assert dispatch.available_backends("cuda", "sample_codes")[:2] == ["triton", "reference"]
    assert dispatch.available_backends("cpu", "sample_codes")[0] == "native"


def test_native_refuses_a_seed(rng):
    require_backend("native", "cpu", "sample_codes")
    z, codebook = _inputs(3, 4, 2, rng)
    with pytest.raises(RuntimeError, match="Philox seed"):
        backend_op("sample_codes", "native")(z, codebook, 0.5, False, 4096, torch.tensor([1]))


def test_triton_opcheck(rng):
    """Schema and fake of the Triton op (the seed fixes its draws, so two runs agree)."""
    require_backend("triton", "cpu", "sample_codes")
    z, codebook = _inputs(20, 12, 5, rng)
    torch.library.opcheck(backend_op("sample_codes", "triton"), (z, codebook, 0.5, False, 7, torch.tensor([3])),
                          test_utils=("test_schema", "test_faketensor"))
