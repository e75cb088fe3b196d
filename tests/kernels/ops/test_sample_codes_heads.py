"""sample_codes with per-head codebooks (codebook [C, K, D], z [N, C, D]): one call for all heads, on
every backend, against its spec. The torch-stream backends (native, reference) draw the uniforms of
[C, N, K] row-major (codebook 0's first: the peer's order), so the call equals C single-codebook calls
on z[:, c] in order, bit for bit; the Philox backend (triton) draws the counters (c N + i) K + k."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, reference, sample_codes
from vqdna.kernels.ops.registry import backend_op
from vqdna.kernels.ops.sample_codes.declaration import PHILOX_BACKENDS
from vqdna.kernels.ops.sample_codes.wrapper import philox_seed
from tests.conftest import backend_params, require_backend
from tests.kernels.ops.test_sample_codes import _assert_codes

# (N, C, K, D): N = 1, K = 1, C = 1 and 3, D not a multiple of 16 (nor of the interpreter's 32-wide
# chunks), several row and code tiles of the interpreter's 16 x 32 tile; small for the interpreter.
SHAPES = [(1, 3, 1, 5), (1, 1, 40, 19), (37, 3, 70, 20), (20, 1, 9, 3), (45, 3, 33, 40)]


def heads_inputs(n, c, k, d, rng):
    """z [N, C, D] with NaN/Inf rows in two heads (N > 3), codebooks [C, K, D] with duplicated codes
    (K > 4: exact ties, the noise decides) and a head-0 row on a duplicated code."""
    z, books = torch.randn(n, c, d, generator=rng) * 0.5, torch.randn(c, k, d, generator=rng) * 0.5
    if k > 4:
        books[:, k - 2:] = books[:, :2]
    if n > 3:
        z[3, c - 1, 1] = math.nan
        z[2, 0] = books[0, 1]
        z[1, c // 2, 0] = math.inf
    return z, books


def _spec(backend, z, books, temp, cosine, block_rows=4096):
    """What `backend` returns in the generator state this is called in (as test_sample_codes._spec)."""
    if backend in PHILOX_BACKENDS:
        return reference.sample_codes_philox(z, books, temp, cosine, philox_seed(z.device))
    return reference.sample_codes(z, books, temp, cosine, block_rows)


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
@pytest.mark.parametrize("n,c,k,d", SHAPES, ids=[f"N{n}-C{c}-K{k}-D{d}" for n, c, k, d in SHAPES])
def test_heads_match_the_spec(backend, device, cosine, n, c, k, d, rng, poison):
    """One call: the spec's codes for the same seed (ties and NaN rows included), every output written
    (poisoned empties), the chosen rows exact, the squared distances of the chosen rows, the generator
    where the spec leaves it."""
    require_backend(backend, device, "sample_codes")
    z, books = heads_inputs(n, c, k, d, rng)
    z, books = z.to(device), books.to(device)
    torch.manual_seed(31)
    got, quantized, dist = sample_codes(z, books, 0.6, cosine=cosine, block_rows=7, backend=backend)
    assert dispatch.last_backend("sample_codes") == backend
    after = torch.rand(3, device=device)
    torch.manual_seed(31)
    want = _spec(backend, z, books, 0.6, cosine, block_rows=7)
    assert torch.equal(after, torch.rand(3, device=device)), "the generator is not where the spec leaves it"
    assert got.dtype == torch.int64 and got.shape == (n, c)
    assert quantized.dtype == dist.dtype == torch.float32 and quantized.shape == (n, c, d) and dist.shape == (n, c)

    def scores():
        torch.manual_seed(31)
        seed = philox_seed(torch.device(device))
        return torch.cat([reference.philox_scores(z[:, h], books[h], 0.6, cosine, seed, h * n) for h in range(c)]).cpu()

    _assert_codes(got.T.reshape(-1), want[0].T.reshape(-1), backend, scores)
    got, quantized, dist, z, books = got.cpu(), quantized.cpu(), dist.cpu(), z.cpu(), books.cpu()
    for h in range(c):
        assert torch.equal(quantized[:, h], books[h][got[:, h]]), f"head {h}: quantized is not the chosen rows"
    want_dist = (z.double() - quantized.double()).pow(2).sum(-1)
    finite = torch.isfinite(z).all(-1)
    torch.testing.assert_close(dist[finite].double(), want_dist[finite], rtol=1e-5, atol=1e-6)
    assert not bool(torch.isfinite(dist[~finite]).any())


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
def test_heads_are_single_codebook_calls_in_order(backend, cosine, rng, poison):
    """The torch stream: one call for C = 3 heads is bit-equal to the same backend's C single-codebook
    calls on the heads' strided rows z[:, c], in order of c, under the same seed (rows sampled in
    blocks of 7: the next head's first block drawn while a head's last is scored), and leaves the
    generator where they do."""
    require_backend(backend, "cpu", "sample_codes")
    n, c, k, d = 30, 3, 21, 6
    z, books = heads_inputs(n, c, k, d, rng)
    torch.manual_seed(8)
    got = sample_codes(z, books, 0.4, cosine=cosine, block_rows=7, backend=backend)
    after = torch.rand(3)
    torch.manual_seed(8)
    singles = [sample_codes(z[:, h], books[h], 0.4, cosine=cosine, block_rows=7, backend=backend) for h in range(c)]
    assert torch.equal(after, torch.rand(3))
    for h, (codes, quantized, dist) in enumerate(singles):
        assert torch.equal(got[0][:, h], codes), f"head {h}: codes differ from its single-codebook call"
        assert torch.equal(got[1][:, h], quantized)
        assert torch.equal(got[2][:, h].view(torch.int32), dist.view(torch.int32)), f"head {h}: dist bits differ"


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_heads_draw_order(backend, device):
    """z = 0 and every code of every codebook equal: head c of row i takes the argmax of its uniforms,
    those of torch.rand(C, N, K)[c, i] (torch stream: [C, N, K] row-major) or tl.rand(seed, (c N + i) K
    + k) (Philox) under the same seed."""
    require_backend(backend, device, "sample_codes")
    n, c, k = (40, 3, 70) if backend == "triton" and device == "cpu" else (300, 3, 200)
    books = torch.ones(1, 1, 4).expand(c, k, 4).contiguous().to(device)
    torch.manual_seed(5)
    got = sample_codes(torch.zeros(n, c, 4, device=device), books, 1.0, block_rows=64, backend=backend)[0]
    torch.manual_seed(5)
    if backend in PHILOX_BACKENDS:
        u = reference.philox_uniform(philox_seed(torch.device(device)), torch.arange(c * n * k, device=device).view(c, n, k))
    else:
        u = torch.rand(c, n, k, device=device)
    assert torch.equal(got, u.argmax(-1).T)


def test_heads_philox_spec_is_offset_single_codebook_counters(rng):
    """reference.sample_codes_philox with codebooks [C, K, D]: column c is the argmin of the single-
    codebook scores of z[:, c] whose counters start at row c N (head 0: the plain single call)."""
    n, c, k, d = 25, 3, 17, 7
    z, books = heads_inputs(n, c, k, d, rng)
    seed = torch.tensor([(1 << 50) + 11], dtype=torch.int64)
    codes, quantized, dist = reference.sample_codes_philox(z, books, 0.8, False, seed)
    for h in range(c):
        scores = reference.philox_scores(z[:, h], books[h], 0.8, False, seed, h * n)
        want = torch.where(torch.isnan(scores), math.inf, scores).argmin(-1)
        assert torch.equal(codes[:, h], want), f"head {h}"
    single = reference.sample_codes_philox(z[:, 0], books[0], 0.8, False, seed)
    assert torch.equal(codes[:, 0], single[0]) and torch.equal(quantized[:, 0], single[1])
    # heads 1 and 2 are not head 0's counters again
    assert not torch.equal(codes[:, 1], reference.sample_codes_philox(z[:, 1], books[1], 0.8, False, seed)[0])


@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
@pytest.mark.parametrize("n,c,k,d", [(1, 3, 1, 5), (33, 3, 40, 19), (17, 2, 65, 64)])
def test_triton_heads_match_the_philox_spec(cosine, n, c, k, d, rng, poison):
    """The op itself (under the interpreter: 16 x 32 tiles, grid axis 1 over the heads) against
    reference.sample_codes_philox with a seed whose high word is set: codes identical (NaN/Inf rows
    included), quantized exact, dist within lookup's tolerance."""
    require_backend("triton", "cpu", "sample_codes")
    z, books = heads_inputs(n, c, k, d, rng)
    seed = torch.tensor([-(1 << 40) + 3], dtype=torch.int64)
    got = backend_op("sample_codes", "triton")(z, books, 0.3, cosine, 4096, seed)
    want = reference.sample_codes_philox(z, books, 0.3, cosine, seed)
    assert torch.equal(got[0], want[0]), f"codes differ at {(got[0] != want[0]).nonzero()[:5].tolist()}"
    assert torch.equal(got[1], want[1])
    finite = torch.isfinite(z).all(-1)
    torch.testing.assert_close(got[2][finite], want[2][finite], rtol=1e-5, atol=1e-5)
    assert not bool(torch.isfinite(got[2][~finite]).any())


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_heads_bad_input(backend, device, rng):
    require_backend(backend, device, "sample_codes")
    z, books = heads_inputs(6, 3, 5, 4, rng)
    z, books = z.to(device), books.to(device)
    with pytest.raises(ValueError, match=r"need z \[N, C, D\] with codebook \[C, K, D\]"):
        sample_codes(z[:, :2], books, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"need z \[N, C, D\] with codebook \[C, K, D\]"):
        sample_codes(z[:, :, :3], books, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"need z \[N, C, D\]"):
        sample_codes(z[:, 0], books, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"C = 0"):
        sample_codes(z[:, :0], books[:0], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"K = 0"):
        sample_codes(z, books[:, :0], 0.5, backend=backend)
    empty = sample_codes(z[:0], books, 0.5, backend=backend)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3, 4) and empty[2].shape == (0, 3)


def test_native_heads_checks_and_opcheck(rng):
    """The op's own checks (mismatched heads) and its schema and fake with per-head codebooks."""
    require_backend("native", "cpu", "sample_codes")
    z, books = heads_inputs(12, 3, 5, 4, rng)
    op = backend_op("sample_codes", "native")
    with pytest.raises(RuntimeError, match=r"need z \[N, C, D\] with codebook \[C, K, D\]"):
        op(z[:, :2], books, 0.5, False, 4096, None)
    torch.library.opcheck(op, (z, books, 0.5, False, 5), test_utils=("test_schema", "test_faketensor"))


def test_triton_heads_opcheck(rng):
    require_backend("triton", "cpu", "sample_codes")
    z, books = heads_inputs(12, 3, 5, 4, rng)
    torch.library.opcheck(backend_op("sample_codes", "triton"), (z, books, 0.5, False, 7, torch.tensor([3])),
                          test_utils=("test_schema", "test_faketensor"))
