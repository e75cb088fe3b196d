"""stem (docs/design.md §2.5): every backend at B*L = 2^16, 2^18, 2^20 bases (rows of 4096), D = 64 and 384,
float32 parameters, float32 / bfloat16 output (and float16 on CUDA), against the reference and the
torch peer a user would write (Conv1d over the one-hot, LayerNorm, GELU; float32, cast at the end).

The stem is memory-bound: GB/s counts the bytes a fused stem must move (uint8 ids in, [N, D]
features out), against the copy bandwidth measured in the run; each row also carries bases_per_s.
The reference and the peer build several [N, D] float32 temporaries, so they are left out above
512 MB of output (and said so in the skip reason).
"""

import pytest
import torch

from bench.conftest import record, require_device, time_call
from vqdna.kernels import dispatch, stem

LENGTH = 4096
BATCHES = [16, 64, 256]  # 2^16, 2^18, 2^20 bases
DIMS = [64, 384]
WIDTH = 5
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
_TEMP_BYTES = {"cpu": 512 << 20, "cuda": 8 << 30}


def _cases():
    for device, mark in (("cpu", pytest.mark.cpu), ("cuda", pytest.mark.cuda)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if dtype not in DTYPES[device]:
                continue
            for d in DIMS:
                for b in BATCHES:
                    yield pytest.param(device, dtype, d, b, marks=mark, id=f"{device}-{str(dtype)[6:]}-D{d}-N{b * LENGTH}")


def _inputs(b, d, device):
    gen = torch.Generator().manual_seed(b * 1000 + d)
    ids = torch.randint(0, 5, (b, LENGTH), generator=gen, dtype=torch.uint8)
    weight = torch.randn(d, 5, WIDTH, generator=gen) / WIDTH
    bias, ln_w, ln_b = torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen)
    return ids.to(device), *(t.to(device) for t in (weight, bias, ln_w, ln_b))


def _record(impl, device, dtype, d, b, seconds, kind="backend"):
    n = b * LENGTH
    elt = torch.empty((), dtype=dtype).element_size()
    row = record("stem", impl, device, dtype, {"B": b, "L": LENGTH, "D": d, "W": WIDTH}, seconds, bytes_moved=n + n * d * elt, kind=kind)
    row["bases_per_s"] = n / seconds


def _too_big_for_temporaries(device, d, b):
    return b * LENGTH * d * 4 > _TEMP_BYTES[torch.device(device).type]


@pytest.mark.parametrize("backend", ["native", "cuda", "triton", "reference"])
@pytest.mark.parametrize("device,dtype,d,b", list(_cases()))
def test_stem_backend(benchmark, backend, device, dtype, d, b):
    require_device(device)
    if dispatch._why_unavailable(backend, torch.device(device), "stem") is not None or (backend == "triton" and device == "cpu"):
        pytest.skip(f"{backend} does not run on {device} here (Triton on the CPU is the interpreter)")
    if backend == "reference" and _too_big_for_temporaries(device, d, b):
        pytest.skip("reference: its [N, D] float32 temporaries exceed the memory budget here")
    ids, *params = _inputs(b, d, device)
    benchmark.group = f"stem-{device}-{str(dtype)[6:]}-D{d}-N{b * LENGTH}"
    t = time_call(benchmark, lambda: stem(ids, *params, out_dtype=dtype, backend=backend), device, 2 if backend == "reference" else 5)
    assert dispatch.last_backend("stem") == backend
    _record(backend, device, dtype, d, b, t)


@pytest.mark.parametrize("device,dtype,d,b", list(_cases()))
def test_stem_torch_conv1d_one_hot(benchmark, device, dtype, d, b):
    """The peer: GELU(LayerNorm(Conv1d(one_hot(ids)))) in float32, cast to the output dtype."""
    require_device(device)
    if _too_big_for_temporaries(device, d, b):
        pytest.skip("torch: its one-hot and [N, D] float32 temporaries exceed the memory budget here")
    ids, weight, bias, ln_w, ln_b = _inputs(b, d, device)
    f = torch.nn.functional

    def peer():
        x = f.one_hot(ids.long(), 6)[..., :5].transpose(1, 2).float()
        y = f.conv1d(x, weight, bias, padding=WIDTH // 2).transpose(1, 2)
        return f.gelu(f.layer_norm(y, (d,), ln_w, ln_b, 1e-6)).to(dtype)

    benchmark.group = f"stem-{device}-{str(dtype)[6:]}-D{d}-N{b * LENGTH}"
    t = time_call(benchmark, peer, device, 3)
    _record("torch", device, dtype, d, b, t, kind="peer")
