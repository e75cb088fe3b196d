"""lookup: every backend against torch addmm+argmin and faiss IndexFlatL2 (when installed), at the
VQ sizes (N=65536, D=384, K in {512, 4096}); GFLOP/s = 2 N K D / time."""

import pytest
import torch

from bench.conftest import record, require_device, time_call
from vqdna.kernels import dispatch, lookup

N, D = 65536, 384
KS = [512, 4096]
DEVICES = [pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def _inputs(k, dtype, device):
    gen = torch.Generator().manual_seed(k)
    codebook = torch.randn(k, D, generator=gen)
    z = codebook[torch.randint(k, (N,), generator=gen)] + 0.5 * torch.randn(N, D, generator=gen)
    return z.to(dtype).to(device), codebook.to(dtype).to(device)


def _cases():
    for device in DEVICES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for k in KS:
                yield pytest.param(device.values[0], dtype, k, marks=device.marks, id=f"{device.values[0]}-{str(dtype)[6:]}-K{k}")


@pytest.mark.parametrize("backend", ["native", "cuda", "triton", "reference"])
@pytest.mark.parametrize("device,dtype,k", list(_cases()))
def test_lookup_backend(benchmark, backend, device, dtype, k):
    require_device(device)
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} not benchmarked on {device}")
    if dispatch._why_unavailable(backend, torch.device(device)) is not None or (backend == "triton" and device == "cpu"):
        pytest.skip(f"{backend} does not run on {device} here")
    z, codebook = _inputs(k, dtype, device)
    sq = codebook.float().pow(2).sum(-1)
    benchmark.group = f"lookup-{device}-{str(dtype)[6:]}-K{k}"
    rounds = 2 if backend == "reference" else 5
    t = time_call(benchmark, lambda: lookup(z, codebook, codebook_sqnorm=sq, backend=backend), device, rounds)
    assert dispatch.last_backend("lookup") == backend
    record("lookup", backend, device, dtype, {"N": N, "K": k, "D": D}, t, 2.0 * N * k * D)


@pytest.mark.parametrize("device,dtype,k", list(_cases()))
def test_lookup_torch_addmm_argmin(benchmark, device, dtype, k):
    """The obvious PyTorch peer: addmm(||e||^2, z, e^T, alpha=-2).argmin(1) (materialises N x K)."""
    require_device(device)
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} not benchmarked on {device}")
    z, codebook = _inputs(k, dtype, device)
    sq = codebook.float().pow(2).sum(-1).to(dtype)
    benchmark.group = f"lookup-{device}-{str(dtype)[6:]}-K{k}"
    t = time_call(benchmark, lambda: torch.addmm(sq, z, codebook.T, alpha=-2).argmin(1), device, 5)
    record("lookup", "torch", device, dtype, {"N": N, "K": k, "D": D}, t, 2.0 * N * k * D, kind="peer")


@pytest.mark.parametrize("k", KS)
def test_lookup_faiss(benchmark, k):
    """faiss-cpu IndexFlatL2 (BLAS GEMM + argmin per block), float32 only."""
    faiss = pytest.importorskip("faiss")
    z, codebook = _inputs(k, torch.float32, "cpu")
    index = faiss.IndexFlatL2(D)
    index.add(codebook.numpy())
    zn = z.numpy()
    benchmark.group = f"lookup-cpu-float32-K{k}"
    t = time_call(benchmark, lambda: index.search(zn, 1), "cpu", 5)
    record("lookup", "faiss", "cpu", torch.float32, {"N": N, "K": k, "D": D}, t, 2.0 * N * k * D, kind="peer")
