"""convnext_block: every backend of its declaration (the native CPU kernel, csrc/ops/convnext_block/cpu.cpp,
and the reference) against the spec vqdna.kernels.reference.convnext_block and the nn.Module, the
wrapper's validation and dispatch, and where the encoder runs the op."""

import pytest
import torch

from tests.conftest import backend_params, require_backend
from vqdna.kernels import convnext_block, dispatch, last_backend, reference
from vqdna.kernels.ops.registry import backend_op, has_kernel
from vqdna.models.convnext import ConvNeXt1dEncoder, ConvNeXtBlock1d, _fused_applies


def _block(dim, kernel_size, mlp_ratio, seed, device="cpu"):
    # Layer scale ~1 (not 1e-6) so the block's branch, not the residual, dominates the comparison.
    torch.manual_seed(seed)
    block = ConvNeXtBlock1d(dim, kernel_size, mlp_ratio, layer_scale_init=1.0)
    with torch.no_grad():
        for p in (block.dwconv.bias, block.norm.weight, block.norm.bias, block.gamma):
            p.normal_()
    return block.to(device)


def _op(backend, block, x, keep, tile_rows=0):
    """The registered op `vqdna::convnext_block_<backend>` itself (no wrapper checks)."""
    return backend_op("convnext_block", backend)(
        x, keep, block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias, block.norm.eps,
        block.pwconv1.weight, block.pwconv1.bias, block.pwconv2.weight, block.pwconv2.bias, block.gamma, tile_rows,
    )


def test_op_is_built():
    assert has_kernel("convnext_block", "native"), "vqdna._C has no vqdna::convnext_block_native: rebuild the extension"


# (B, L, D, kernel_size, mlp_ratio, tile_rows): odd and tiny channel counts, records shorter than the
# kernel, and tiles (0: the default 512) that split records so tile edges fall inside the halo.
SHAPES = [
    (1, 1, 1, 3, 1, 0), (2, 2, 3, 7, 4, 1), (1, 5, 5, 7, 2, 2), (3, 7, 17, 5, 4, 3), (2, 70, 64, 7, 4, 16),
    (1, 129, 65, 3, 3, 0), (2, 600, 33, 7, 4, 0), (1, 1100, 12, 9, 4, 0), (2, 300, 384, 7, 4, 100),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch,length,dim,kernel_size,mlp_ratio,tile_rows", SHAPES)
@pytest.mark.parametrize("backend,device", backend_params("convnext_block"))
def test_matches_reference(backend, device, batch, length, dim, kernel_size, mlp_ratio, tile_rows, masked, rng):
    require_backend(backend, device, "convnext_block")
    block = _block(dim, kernel_size, mlp_ratio, seed=length * dim, device=device)
    x = torch.randn(batch, length, dim, generator=rng).to(device)
    keep = (torch.rand(batch, length, generator=rng) > 0.3).to(device) if masked else None
    with torch.no_grad():
        got = convnext_block(x, keep, *block._params(), ln_eps=block.norm.eps, tile_rows=tile_rows, backend=backend)
        want = block(x) if keep is None else block(x) * keep[..., None]  # the nn.Module's ops
    assert last_backend("convnext_block") == backend
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if keep is not None:
        assert (got[~keep] == 0).all()


def test_native_skips_masked_rows(rng):
    """The native kernel convolves and multiplies only the kept rows (packed short records leave about a
    quarter of the rows masked, vqdna.streaming.packing): its GEMMs see keep.sum() rows in all, none for
    an all-masked record, and the result is still the spec's."""
    require_backend("native", "cpu", "convnext_block")
    block = _block(16, 7, 4, seed=3)
    x = torch.randn(3, 300, 16, generator=rng)
    keep = torch.rand(3, 300, generator=rng) > 0.4
    keep[1] = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiles' GEMMs run in this thread, where the profiler records them
    try:
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            got = _op("native", block, x, keep, 100)
    finally:
        torch.set_num_threads(threads)
    rows = [e.input_shapes[1][0] for e in prof.events() if e.name == "aten::addmm"]
    assert sum(rows) == 2 * int(keep.sum()) and len(rows) == 2 * 6  # two GEMMs per tile of records 0 and 2
    with torch.no_grad():
        torch.testing.assert_close(got, block(x) * keep[..., None], rtol=1e-5, atol=1e-5)


def test_spec_is_the_module():
    """reference.convnext_block is the nn.Module's own ops (what training differentiates), bit for bit,
    gradients included, and computes float64 in float64."""
    block = _block(12, 7, 4, seed=1)
    x = torch.randn(2, 30, 12, requires_grad=True)
    y = torch.nn.functional.conv1d(x.transpose(1, 2), block.dwconv.weight, block.dwconv.bias, padding=3, groups=12)
    y = block.pwconv2(torch.nn.functional.gelu(block.pwconv1(block.norm(y.transpose(1, 2)))))
    want = x + block.gamma * y
    got = reference.convnext_block(x, None, *block._params(), ln_eps=block.norm.eps)
    assert torch.equal(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(g_got, g_want)
    wide = block.double()
    assert reference.convnext_block(x.detach().double(), None, *wide._params()).dtype == torch.float64


def test_rejects_bad_inputs():
    block = _block(8, 7, 4, seed=0)
    # The native kernel's own checks (the registered op called directly).
    with torch.no_grad(), pytest.raises(RuntimeError, match="convnext_block: x must be float32"):
        _op("native", block, torch.zeros(1, 4, 8, dtype=torch.float64), None)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dw_weight must be"):
        _op("native", block, torch.zeros(1, 4, 9), None)
    with torch.no_grad(), pytest.raises(RuntimeError, match="keep must be"):
        _op("native", block, torch.zeros(1, 4, 8), torch.ones(1, 5, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(RuntimeError, match="tile_rows must be"):
        _op("native", block, torch.zeros(1, 4, 8), None, -1)
    # The wrapper's, before any backend: they name the tensor.
    params = block._params()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"dw_weight must be \[D, 1, odd k\] with D = 9"):
            convnext_block(torch.zeros(1, 4, 9), None, *params)
        with pytest.raises(ValueError, match=r"keep must be a bool \[B, L\] = \[1, 4\]"):
            convnext_block(torch.zeros(1, 4, 8), torch.ones(1, 5, dtype=torch.bool), *params)
        with pytest.raises(ValueError, match=r"b1 must be \[32\]"):
            convnext_block(torch.zeros(1, 4, 8), None, *params[:5], torch.zeros(31), *params[6:])
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            convnext_block(torch.zeros(1, 4, 8, dtype=torch.long), None, *params)
        with pytest.raises(ValueError, match="tile_rows must be >= 0"):
            convnext_block(torch.zeros(1, 4, 8), None, *params, tile_rows=-1)
    with pytest.raises(RuntimeError, match="inference only"):  # parameters require grad, grad mode on
        convnext_block(torch.zeros(1, 4, 8), None, *params)


def test_dispatch_takes_native_for_float32_cpu_only(rng):
    block = _block(8, 7, 4, seed=2)
    x = torch.randn(2, 9, 8, generator=rng)
    with torch.no_grad():
        convnext_block(x, None, *block._params())
        assert last_backend("convnext_block") == "native"
        wide = block.double()
        convnext_block(x.double(), None, *wide._params())
        assert last_backend("convnext_block") == "reference"  # float64: only the spec
        half = block.to(torch.bfloat16)
        got = convnext_block(x.bfloat16(), None, *half._params())
        assert last_backend("convnext_block") == "reference" and got.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="native kernel takes float32 tensors only"):
            convnext_block(x.bfloat16(), None, *half._params(), backend="native")
    assert dispatch.available_backends("cpu", "convnext_block") == ["native", "reference"]
    assert "triton" not in dispatch.available_backends("cpu", "convnext_block")  # no Triton kernel (yet)


@pytest.mark.parametrize("backend,device", backend_params("convnext_block"))
def test_opcheck(backend, device, rng):
    """torch.library's own checks of the registered op (schema, the one fake, no autograd)."""
    require_backend(backend, device, "convnext_block")
    block = _block(6, 3, 2, seed=3, device=device).requires_grad_(False)
    x = torch.randn(2, 5, 6, generator=rng).to(device)
    keep = (torch.rand(2, 5, generator=rng) > 0.3).to(device)
    args = (x, keep, *block._params()[:4], 1e-6, *block._params()[4:], 0)
    torch.library.opcheck(backend_op("convnext_block", backend), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_encoder_runs_native_only_without_autograd(monkeypatch, rng):
    enc = ConvNeXt1dEncoder(16, 2, taps=(1, 2), layer_scale_init=1.0)
    ids = torch.randint(0, 6, (2, 50), generator=rng)
    x = torch.zeros(1, 3, 16)
    assert not _fused_applies(x)  # grad enabled: the module's ops (autograd)
    with torch.no_grad():
        assert _fused_applies(x)
        fused = enc(ids)
        assert last_backend("convnext_block") == "native"
        monkeypatch.setenv("VQDNA_BACKEND", "reference")
        spec = enc(ids)
        assert last_backend("convnext_block") == "reference"
    for got, want in zip(fused, spec):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got[ids == 5] == 0).all()
