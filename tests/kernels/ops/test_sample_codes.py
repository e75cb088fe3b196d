"""sample_codes: Gumbel-max sampling with the draws of torch's uniform_ from the default generator
(reference.sample_codes). The native kernel draws from the generator's engine itself: the same
numbers (hence the same codes) and the same generator state afterwards as the reference's torch ops."""

import math

import pytest
import torch

from vqdna.kernels import dispatch, reference, sample_codes
from vqdna.kernels.ops.registry import backend_op
from tests.conftest import backend_params, require_backend


def _inputs(n, k, d, rng, scale=1.0):
    return torch.randn(n, d, generator=rng) * scale, torch.randn(k, d, generator=rng) * scale


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
@pytest.mark.parametrize("n,k,d,block_rows", [(1, 1, 1, 4096), (50, 37, 6, 7), (300, 64, 19, 4096), (129, 5, 3, 128)])
def test_codes_and_generator_state_match_the_torch_ops(backend, device, cosine, n, k, d, block_rows, rng, poison):
    """Same seed: the reference's codes, and the generator where uniform_ leaves it (the next draw agrees).
    K not a multiple of 8 (the vector tail), blocks not dividing N, a NaN row (torch's argmin: index 0)."""
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
    want, _, _ = reference.sample_codes(z.to(device), codebook.to(device), 0.7, cosine, block_rows)
    assert device != "cpu" or torch.equal(torch.get_rng_state(), state), "the CPU generator's state differs"
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got.cpu(), want.cpu()), f"codes differ at rows {(got.cpu() != want.cpu()).nonzero()[:5].tolist()}"
    assert torch.equal(after, torch.rand(4, device=device)), "the generator is not where uniform_ leaves it"
    # The chosen rows bit-exact, and their squared distances (float32 sums in another order).
    assert quantized.dtype == dist.dtype == torch.float32 and quantized.shape == (n, d) and dist.shape == (n,)
    assert torch.equal(quantized.cpu(), codebook[got.cpu()])
    want_dist = (z.double() - codebook.double()[got.cpu()]).pow(2).sum(-1)
    finite = torch.isfinite(z).all(-1)
    torch.testing.assert_close(dist.cpu()[finite].double(), want_dist[finite], rtol=1e-5, atol=1e-6)
    assert not bool(torch.isfinite(dist.cpu()[~finite]).any())


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_draws_are_torch_rand(backend, device):
    """z = 0 and one code repeated: every distance is equal, so the code is the argmax of the row's
    uniforms: those of torch.rand(N, K) under the same seed, element for element in row-major order."""
    require_backend(backend, device, "sample_codes")
    n, k = 500, 300
    codebook = torch.ones(1, 4).expand(k, 4).contiguous().to(device)
    torch.manual_seed(5)
    got = sample_codes(torch.zeros(n, 4, device=device), codebook, 1.0, block_rows=64, backend=backend)[0]
    torch.manual_seed(5)
    u = torch.rand(n, k, device=device)
    assert torch.equal(got, u.argmax(-1))
    torch.manual_seed(5)
    got = sample_codes(torch.zeros(n, 4, device=device), codebook, 1.0, cosine=True, backend=backend)[0]
    assert torch.equal(got, u.argmax(-1))


@pytest.mark.parametrize("backend,device", backend_params("sample_codes"))
def test_strided_rows_and_bad_input(backend, device, rng):
    require_backend(backend, device, "sample_codes")
    z, codebook = _inputs(40, 20, 8, rng)
    heads = z.reshape(20, 2, 8).transpose(0, 1)  # [2, 20, 8]: rows with stride 16, as VectorQuantizer's heads
    torch.manual_seed(1)
    got = sample_codes(heads[1], codebook, 0.5, backend=backend)
    torch.manual_seed(1)
    want = reference.sample_codes(heads[1].contiguous(), codebook, 0.5)
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
