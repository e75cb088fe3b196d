"""The Triton launchers' paths that only some shapes reach (issue: GPU code checked without a GPU,
item 8): HRQ with more levels than one launch fuses, the EMA sorted path in fast mode, no host sync
in a steady-state call, autotuning per size class of N, and launches on a non-current device.
The CPU cases run under TRITON_INTERPRET=1; the `cuda` ones when a GPU is lent."""

import pytest
import torch

from tests.conftest import require_backend
from tests.kernels.ops.test_hrq_quantize import make_levels
from vqdna.kernels import dispatch, ema_stats, hrq_quantize, lookup, reference

pytest.importorskip("triton")


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("triton", "cuda", "lookup")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hrq_five_levels_two_launches(device, dtype, rng, poison):
    """L = 5: one launch for levels 0-3, a second for level 4 that reads the earlier codes back."""
    if device == "cuda":
        _cuda()
    require_backend("triton", device, "hrq_quantize")
    n, d, sizes = (40, 8, (2, 3, 4, 5, 6)) if device == "cpu" else (3000, 384, (8, 16, 64, 128, 512))
    zs, codebooks = make_levels(n, d, sizes, dtype, device, rng)
    codes, levels = hrq_quantize(zs, codebooks, backend="triton")
    assert dispatch.last_backend("hrq_quantize") == "triton"
    ref_codes, ref_levels = hrq_quantize([z.cpu() for z in zs], [c.cpu() for c in codebooks], backend="reference")
    # Same codes away from near-ties: compare where the reference's choice is clear at every level.
    agree = (codes.cpu() == ref_codes).float().mean().item()
    assert agree > 0.99, f"level codes agree on {agree:.3f} of the rows"
    rows = (codes.cpu() == ref_codes).all(0)
    assert torch.equal(levels.cpu()[:, rows], ref_levels[:, rows])


@pytest.mark.cuda
@pytest.mark.parametrize("n", [(1 << 15) - 1, (1 << 15) + 3], ids=["direct", "sorted"])
def test_ema_fast_mode_both_paths_cuda(n, rng):
    """Fast mode switches from per-row atomics to the sorted path at 2^15 rows on a GPU."""
    _cuda()
    from vqdna.kernels.ops.ema_stats import triton_kernel as ema_update

    assert ema_update.path(n, deterministic=False) == ("direct" if n < (1 << 15) else "sorted")
    k, d = 512, 96
    x = torch.randn(n, d, generator=rng)
    codes = (torch.rand(n, generator=rng).pow(3) * k).long().clamp_max(k - 1).to(torch.int32)
    mask = torch.rand(n, generator=rng) < 0.9
    counts, sums = ema_stats(x.cuda(), codes.cuda(), k, mask=mask.cuda(), deterministic=False, backend="triton")
    assert dispatch.last_backend("ema_stats") == "triton"
    ref_n, ref_s, _ = reference.ema_update(
        x.double(), codes, torch.zeros(k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64),
        decay=0.0, eps=0.0, mask=mask,
    )
    assert torch.equal(counts.cpu().double(), ref_n)
    assert torch.allclose(sums.cpu().double(), ref_s, rtol=1e-5, atol=1e-3)


@pytest.mark.cuda
def test_triton_steady_state_calls_do_not_sync_cuda(rng):
    """After the first call (autotuning benchmarks, and syncs), lookup and HRQ launch without a sync."""
    _cuda()
    zs, codebooks = make_levels(4096, 384, (64, 512), torch.bfloat16, "cuda", rng)
    hrq_quantize(zs, codebooks, backend="triton")
    lookup(zs[0], codebooks[0], backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hrq_quantize(zs, codebooks, backend="triton")
        lookup(zs[0], codebooks[0], backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_autotune_per_size_class_cuda(rng):
    """A first call at N = 1 does not fix the config for N = 2^16 (the key holds N's size class)."""
    _cuda()
    from vqdna.kernels.ops.lookup import triton_kernel as triton_lookup
    from vqdna.kernels.triton.common import size_class

    e = torch.randn(512, 384, generator=rng).to("cuda", torch.bfloat16)
    for n in (1, 1 << 16):
        lookup(torch.randn(n, 384, generator=rng).to("cuda", torch.bfloat16), e, backend="triton")
    classes = {key[0] for key in triton_lookup._lookup_kernel.cache}
    assert {size_class(1), size_class(1 << 16)} <= classes


@pytest.mark.cuda
def test_triton_launches_on_the_tensors_device_cuda(rng):
    """Tensors on cuda:1 while cuda:0 is current: the launch follows the tensors."""
    _cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    z = torch.randn(1000, 64, generator=rng)
    e = torch.randn(128, 64, generator=rng)
    ref = lookup(z, e, backend="reference")[0]
    with torch.cuda.device(0):
        codes = lookup(z.to("cuda:1"), e.to("cuda:1"), backend="triton")[0]
        zs, cbs = make_levels(500, 64, (16, 64), torch.float32, "cuda:1", rng)
        hrq_codes = hrq_quantize(zs, cbs, backend="triton")[0]
    assert codes.device.index == 1 and torch.equal(codes.cpu(), ref)
    ref_hrq = hrq_quantize([z.cpu() for z in zs], [c.cpu() for c in cbs], backend="reference")[0]
    assert (hrq_codes.cpu() == ref_hrq).float().mean() > 0.99
