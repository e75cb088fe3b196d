"""Quantizer ops and modules: hrq_quantize against the two plain lookups it contains, ema_stats
against torch index_add_, and VectorQuantizer against vector-quantize-pytorch's VectorQuantize
(eval and training forward), at VQ K=512, D=384 and HRQ 64/512, D=384, N=65536."""

import pytest
import torch

from bench.conftest import record, require_device, time_call
from vqdna import VectorQuantizer
from vqdna.kernels import dispatch, ema_stats, hrq_quantize, lookup

N, D, K, HRQ_SIZES = 65536, 384, 512, (64, 512)
BACKENDS = ["native", "cuda", "triton", "reference"]
DEVICES = [pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)]


def _skip_unless(backend, device, op):
    require_device(device)
    if dispatch._why_unavailable(backend, torch.device(device), op) is not None or (backend == "triton" and device == "cpu"):
        pytest.skip(f"{backend} {op} does not run on {device} here")


def _hrq_inputs(device, dtype):
    gen = torch.Generator().manual_seed(0)
    codebooks = [torch.randn(k, D, generator=gen) for k in HRQ_SIZES]
    zs = [torch.randn(N, D, generator=gen) for _ in HRQ_SIZES]
    return [z.to(device, dtype) for z in zs], [c.to(device, dtype) for c in codebooks]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_hrq_quantize(benchmark, backend, device, dtype):
    _skip_unless(backend, device, "hrq_quantize")
    zs, codebooks = _hrq_inputs(device, dtype)
    benchmark.group = f"hrq-{device}-{dtype}"
    t = time_call(benchmark, lambda: hrq_quantize(zs, codebooks, backend=backend), device, 2 if backend == "reference" else 5)
    assert dispatch.last_backend("hrq_quantize") == backend
    flops = 2.0 * N * D * sum(HRQ_SIZES)
    record("hrq_quantize", backend, device, dtype, {"N": N, "D": D, "K": list(HRQ_SIZES)}, t, flops)


@pytest.mark.parametrize("backend", ["native", "cuda", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_hrq_two_plain_lookups(benchmark, backend, device, dtype):
    """The cost floor of fused HRQ: the two lookups it contains, H_1 precomputed for free."""
    _skip_unless(backend, device, "lookup")
    zs, codebooks = _hrq_inputs(device, dtype)
    h1 = 2 * zs[1] - codebooks[0][torch.randint(HRQ_SIZES[0], (N,), device=device)]

    def two():
        lookup(zs[0], codebooks[0], backend=backend)
        lookup(h1, codebooks[1], backend=backend)

    benchmark.group = f"hrq-{device}-{dtype}"
    t = time_call(benchmark, two, device)
    record("hrq_quantize", f"2x lookup ({backend})", device, dtype, {"N": N, "D": D, "K": list(HRQ_SIZES)}, t,
           2.0 * N * D * sum(HRQ_SIZES), kind="peer")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_ema_stats(benchmark, backend, device, deterministic):
    _skip_unless(backend, device, "ema_stats")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen).to(device)
    codes = torch.randint(K, (N,), generator=gen, dtype=torch.int32).to(device)
    benchmark.group = f"ema-{device}"
    t = time_call(benchmark, lambda: ema_stats(x, codes, K, deterministic=deterministic, backend=backend), device)
    record("ema_stats", f"{backend}{'-det' if deterministic else ''}", device, torch.float32,
           {"N": N, "D": D, "K": K}, t, bytes_moved=x.numel() * 4 + codes.numel() * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_ema_stats_torch_index_add(benchmark, device):
    require_device(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen).to(device)
    codes = torch.randint(K, (N,), generator=gen).to(device)

    def peer():
        counts = torch.zeros(K, device=device).index_add_(0, codes, torch.ones(N, device=device))
        sums = torch.zeros(K, D, device=device).index_add_(0, codes, x)
        return counts, sums

    benchmark.group = f"ema-{device}"
    t = time_call(benchmark, peer, device)
    record("ema_stats", "torch index_add_", device, torch.float32, {"N": N, "D": D, "K": K}, t,
           bytes_moved=x.numel() * 4 + codes.numel() * 4, kind="peer")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("impl", ["vqdna", "reference", "vector-quantize-pytorch"])
@pytest.mark.parametrize("device", DEVICES)
def test_vector_quantizer_module(benchmark, impl, mode, device, monkeypatch):
    require_device(device)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2)).to(device)
    if impl == "vector-quantize-pytorch":
        vqp = pytest.importorskip("vector_quantize_pytorch")
        module = vqp.VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.5).to(device)
        inp = x[None]  # it expects [B, N, D]
    else:
        if impl == "reference":
            monkeypatch.setenv("VQDNA_BACKEND", "reference")
        else:
            monkeypatch.delenv("VQDNA_BACKEND", raising=False)
        module = VectorQuantizer(dim=D, codebook_size=K).to(device)
        inp = x
    module.train(mode == "train")
    benchmark.group = f"VectorQuantizer-{mode}-{device}"

    def step():
        with torch.no_grad():
            module(inp)

    t = time_call(benchmark, step, device, 2 if impl == "reference" else 5)
    name = "reference" if impl == "reference" else impl
    record(f"VectorQuantizer-{mode}", name, device, torch.float32, {"N": N, "D": D, "K": K}, t, 2.0 * N * K * D,
           kind="peer" if impl == "vector-quantize-pytorch" else "backend")
