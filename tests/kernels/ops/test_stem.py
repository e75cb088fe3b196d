"""stem: every backend against the float64 reference and against Conv1d over the one-hot (docs/design.md §2.5)."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import backend_params, require_backend
from tests.tolerances import STEM_TOL
from vqdna.kernels import dispatch, reference, stem
from vqdna.kernels.ops.registry import backend_op

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, L, D, W): B = 1, L = 1, L < W, D not a multiple of 8 or 16, D = 1, D = 384, W = 1/3/5/7, and
# W = 9 / 33 / 65 (the CUDA kernel reads a window's ids 32 taps per warp shuffle round).
SHAPES = [
    (1, 1, 1, 5),
    (1, 1, 16, 5),
    (2, 3, 17, 7),
    (3, 29, 12, 5),
    (4, 33, 1, 3),
    (2, 50, 31, 1),
    (1, 40, 384, 5),
    (2, 37, 64, 7),
    (5, 17, 100, 5),
    (2, 30, 20, 9),
    (2, 45, 24, 33),
    (1, 80, 40, 65),
]


def make_inputs(b, length, d, width, gen, device="cpu"):
    """Random bases with ~15% pad ids, row 0 of a batch of >= 3 all N; LayerNorm near identity.
    Parameters float32."""
    ids = torch.randint(0, 5, (b, length), generator=gen)
    ids[torch.rand(b, length, generator=gen) < 0.15] = reference.BASE_PAD_ID
    if b >= 3:
        ids[0] = 4
    weight = torch.randn(d, 5, width, generator=gen)
    bias = 0.5 * torch.randn(d, generator=gen)
    ln_w = 1.0 + 0.2 * torch.randn(d, generator=gen)
    ln_b = 0.2 * torch.randn(d, generator=gen)
    return (ids.to(torch.uint8).to(device), *(t.to(device) for t in (weight, bias, ln_w, ln_b)))


def truth(ids, weight, bias, ln_w, ln_b):
    """The spec in float64 on the same parameter values."""
    return reference.stem(ids.cpu(), *(t.double().cpu() for t in (weight, bias, ln_w, ln_b)))


def assert_stem_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    rtol, atol = STEM_TOL[dtype]
    got = got.double().cpu()
    both_nan = torch.isnan(got) & torch.isnan(want)
    err = torch.where(both_nan, 0.0, (got - want).abs())
    err = torch.where(torch.isnan(err), torch.inf, err)  # a NaN on one side only is an error
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} values off; first at {tuple(bad.nonzero()[0].tolist())}: "
        f"got {float(got[bad][0])}, want {float(want[bad][0])}"
    )


def _shape_params():
    params = []
    for bp in backend_params("stem"):
        for shape in SHAPES:
            for dtype in OUT_DTYPES:
                name = f"{bp.id}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}"
                params.append(pytest.param(*bp.values, shape, dtype, marks=bp.marks, id=name))
    return params


@pytest.mark.parametrize("backend,device,shape,dtype", _shape_params())
def test_matches_reference(backend, device, shape, dtype, rng, poison):
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(*shape, rng, device)
    got = stem(ids, *params, out_dtype=dtype, backend=backend)
    assert dispatch.last_backend("stem") == backend
    assert_stem_close(got, truth(ids, *params), dtype)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_conv1d_one_hot_peer(backend, device, rng):
    """GELU(LayerNorm(Conv1d(one_hot(x)))), the model's formulation, in float32."""
    require_backend(backend, device, "stem")
    ids, weight, bias, ln_w, ln_b = make_inputs(3, 45, 24, 5, rng, device)
    one_hot = F.one_hot(ids.long(), 6)[..., :5].permute(0, 2, 1).float()  # pad -> zero column
    conv = F.conv1d(one_hot, weight, bias, padding=2).permute(0, 2, 1)
    want = F.gelu(F.layer_norm(conv, (24,), ln_w, ln_b, 1e-6))
    got = stem(ids, weight, bias, ln_w, ln_b, backend=backend)
    assert_stem_close(got, want.double().cpu(), torch.float32)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_padding_inside_a_batch_changes_nothing(backend, device, rng):
    """A record padded to the batch length (pad id 5) encodes exactly as the record alone, and the
    id dtype and layout (uint8 / int32 / int64 / int16, non-contiguous) do not matter."""
    require_backend(backend, device, "stem")
    _, weight, bias, ln_w, ln_b = make_inputs(1, 1, 40, 5, rng, device)
    record = torch.randint(0, 5, (1, 23), generator=rng).to(device)
    batch = torch.full((2, 31), reference.BASE_PAD_ID, dtype=torch.int64, device=device)
    batch[0, :23] = record[0]
    batch[1, 8:] = torch.randint(0, 5, (23,), generator=rng).to(device)
    alone = stem(record, weight, bias, ln_w, ln_b, backend=backend)
    padded = stem(batch, weight, bias, ln_w, ln_b, backend=backend)
    assert torch.equal(padded[0, :23], alone[0])
    for dtype in (torch.uint8, torch.int32, torch.int16):
        assert torch.equal(stem(batch.to(dtype), weight, bias, ln_w, ln_b, backend=backend), padded)
    strided = torch.zeros(31, 4, dtype=torch.uint8, device=device)
    strided[:, 1:3] = batch.T.to(torch.uint8)
    ids_nc = strided[:, 1:3].T  # [2, 31], non-contiguous
    assert not ids_nc.is_contiguous()
    assert torch.equal(stem(ids_nc, weight, bias, ln_w, ln_b, backend=backend), padded)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_non_finite_parameters(backend, device, rng, poison):
    """An Inf / NaN weight makes exactly the positions that use it NaN, as in the spec."""
    require_backend(backend, device, "stem")
    ids, weight, bias, ln_w, ln_b = make_inputs(2, 30, 20, 5, rng, device)
    ids[:, :] = torch.randint(0, 5, (2, 30), generator=rng).to(device)
    weight[3, 2, 1] = float("inf")  # base G seen through tap 1
    weight[7, 0, 4] = float("nan")  # base A seen through tap 4
    want = truth(ids, weight, bias, ln_w, ln_b)
    assert 0 < int(torch.isnan(want[..., 0]).sum()) < want.shape[0] * want.shape[1]  # some rows, not all
    assert_stem_close(stem(ids, weight, bias, ln_w, ln_b, backend=backend), want, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_half_precision_parameters(backend, device, rng):
    """bfloat16 / float16 parameters are read as float32 (accumulation stays float32)."""
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(2, 19, 33, 5, rng, device)
    for dtype in (torch.bfloat16, torch.float16):
        low = [p.to(dtype) for p in params]
        got = stem(ids, *low, out_dtype=dtype, backend=backend)
        assert_stem_close(got, truth(ids, *low), dtype)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_bad_ids_name_row_and_column(backend, device, rng):
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(3, 12, 8, 5, rng, device)
    for value, dtype in ((6, torch.uint8), (255, torch.uint8), (-1, torch.int64), (1 << 40, torch.int64)):
        bad = ids.to(dtype).clone()
        bad[2, 7] = value
        bad[2, 9] = value
        with pytest.raises(ValueError, match=rf"ids\[2, 7\] = {value} is not a base id"):
            stem(bad, *params, backend=backend)


@pytest.mark.parametrize(
    "backend,device",
    [pytest.param("triton", "cpu", id="triton-cpu"), pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda)],
)
def test_unchecked_bad_ids_write_nan(backend, device, rng):
    """With the wrapper's check off, a bad id poisons the positions whose window holds it (NaN),
    never reads out of bounds, and leaves every other position exact."""
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(2, 20, 8, 5, rng, device)
    bad = ids.to(torch.int64).clone()
    bad[1, 10] = 77
    got = stem(bad, *params, backend=backend, check_ids=False)
    nan_rows = torch.isnan(got).all(-1).cpu()
    expect = torch.zeros(2, 20, dtype=torch.bool)
    expect[1, 8:13] = True
    assert torch.equal(nan_rows, expect)
    assert not bool(torch.isnan(got[~expect.to(device)]).any())
    ok = truth(ids, *params)
    assert_stem_close(got[0], ok[0], torch.float32)


def test_argument_errors(rng):
    ids, weight, bias, ln_w, ln_b = make_inputs(2, 9, 8, 5, rng)
    with pytest.raises(ValueError, match=r"weight must be \[D >= 1, 5, odd width\]"):
        stem(ids, weight[:, :4], bias, ln_w, ln_b)
    with pytest.raises(ValueError, match=r"weight must be \[D >= 1, 5, odd width\]"):
        stem(ids, torch.randn(8, 5, 4), bias, ln_w, ln_b)
    with pytest.raises(ValueError, match=r"bias must be \[D\] = \[8\]"):
        stem(ids, weight, bias[:7], ln_w, ln_b)
    with pytest.raises(ValueError, match=r"ln_bias must be \[D\] = \[8\]"):
        stem(ids, weight, bias, ln_w, torch.zeros(9))
    with pytest.raises(ValueError, match=r"ids must be a \[B, L\] tensor"):
        stem(ids[0], weight, bias, ln_w, ln_b)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        stem(ids.float(), weight, bias, ln_w, ln_b)
    with pytest.raises(TypeError, match="out_dtype"):
        stem(ids, weight, bias, ln_w, ln_b, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="float64 inputs run only on the reference"):
        stem(ids, weight.double(), bias, ln_w, ln_b, backend="native")


def test_native_kernel_checks_its_arguments(rng):
    """The registered native op validates what the wrapper would (it can be called directly)."""
    require_backend("native", "cpu", "stem")
    ids, weight, bias, ln_w, ln_b = make_inputs(2, 9, 8, 5, rng)
    op = backend_op("stem", "native")
    with pytest.raises(RuntimeError, match="weight must be"):
        op(ids, weight[:, :3], bias, ln_w, ln_b, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="must be \\[D\\]"):
        op(ids, weight, bias[:3], ln_w, ln_b, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="float32"):
        op(ids, weight.double(), bias, ln_w, ln_b, 1e-6, torch.float32)
    with pytest.raises(ValueError, match=r"ids\[1, 3\] = 9"):
        bad = ids.clone()
        bad[1, 3] = 9
        op(bad, weight, bias, ln_w, ln_b, 1e-6, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_opcheck(backend, device, rng):
    """torch.library's own checks of the registered op (schema, fake impl, autograd registration)."""
    require_backend(backend, device, "stem")
    op = backend_op("stem", backend)
    ids, *params = make_inputs(2, 11, 12, 5, rng, device)
    params = [p.requires_grad_() for p in params]
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(op, (ids, *params, 1e-6, torch.bfloat16), test_utils=tests)
    if not (backend == "triton" and device == "cpu"):
        tests = tests + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, (ids, *params, 1e-6, torch.float32), test_utils=tests)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_torch_compile_fullgraph(backend, rng):
    require_backend(backend, "cpu", "stem")
    ids, weight, bias, ln_w, ln_b = make_inputs(3, 21, 16, 5, rng)

    def f(ids, weight, bias, ln_w, ln_b):
        return stem(ids, weight, bias, ln_w, ln_b, backend=backend).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(ids, weight, bias, ln_w, ln_b), f(ids, weight, bias, ln_w, ln_b), atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params("stem"))
def test_gradients_match_reference(backend, device, rng):
    """weight, bias, ln_weight, ln_bias gradients through the fast forward equal the float64 spec's;
    half-precision parameters get gradients in their dtype."""
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(3, 26, 10, 5, rng, device)
    upstream = torch.randn(3, 26, 10, generator=rng).to(device)
    fast = [p.clone().requires_grad_() for p in params]
    (stem(ids, *fast, backend=backend) * upstream).sum().backward()
    exact = [p.detach().double().cpu().requires_grad_() for p in params]
    (reference.stem(ids.cpu(), *exact) * upstream.double().cpu()).sum().backward()
    for name, got, want in zip(("weight", "bias", "ln_weight", "ln_bias"), fast, exact):
        scale = float(want.grad.abs().max())
        assert torch.allclose(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=1e-5 * scale), name
    half = [p.to(torch.bfloat16).requires_grad_() for p in params]
    stem(ids, *half, out_dtype=torch.bfloat16, backend=backend).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in half)


def test_gradcheck_reference_float64(rng):
    ids, *params = make_inputs(2, 6, 3, 3, rng)
    params = [p.double().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *p: stem(ids, *p, backend="reference"), params)


def _slow_params():
    return [
        pytest.param("triton", "cpu", 4, 700, 384, 5, id="triton-cpu-4x700x384"),
        pytest.param("native", "cpu", 16, 4099, 384, 5, id="native-cpu-16x4099x384"),
        pytest.param("native", "cpu", 3, 5000, 1030, 7, id="native-cpu-3x5000x1030"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend,device,b,length,d,width", _slow_params())
def test_large_shapes(backend, device, b, length, d, width, rng, poison):
    require_backend(backend, device, "stem")
    ids, *params = make_inputs(b, length, d, width, rng, device)
    for dtype in OUT_DTYPES:
        assert_stem_close(stem(ids, *params, out_dtype=dtype, backend=backend), truth(ids, *params), dtype)


def test_model_stem_module_is_the_op(rng):
    """ConvNeXt1dEncoder's stem runs the fused op (default backend) yet equals the Conv1d(one_hot) +
    LayerNorm + GELU of its own nn.Conv1d / nn.LayerNorm, forward and backward; checkpoint names stay."""
    from vqdna.models.convnext import ConvNeXt1dEncoder

    enc = ConvNeXt1dEncoder(24, 2, taps=(1, 2))
    s = enc.stem
    with torch.no_grad():
        s.norm.weight.normal_(generator=rng)
        s.norm.bias.normal_(generator=rng)
    assert {"stem.conv.weight", "stem.conv.bias", "stem.norm.weight", "stem.norm.bias"} <= set(enc.state_dict())
    ids = torch.randint(0, 6, (3, 40), generator=rng)
    upstream = torch.randn(3, 40, 24, generator=rng)
    got = s(ids)
    assert dispatch.last_backend("stem") == dispatch.available_backends("cpu", "stem")[0]
    (got * upstream).sum().backward()
    got_grads = [p.grad.clone() for p in s.parameters()]
    s.zero_grad()
    one_hot = F.one_hot(ids, 6)[..., :5].permute(0, 2, 1).float()
    want = F.gelu(s.norm(s.conv(one_hot).permute(0, 2, 1)))
    (want * upstream).sum().backward()
    assert_stem_close(got.detach(), want.detach().double(), torch.float32)
    for g, p in zip(got_grads, s.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()))


# CUDA: one shape per kernel instantiation (VPT = 4, 12, 32, 64 features per lane) with windows of
# more than 32 taps (the ids are shuffled 32 taps per round) and tables that fit an A100.
_CUDA_SHAPES = [(2, 40, 100, 33), (1, 80, 100, 65), (2, 40, 200, 33), (1, 30, 1000, 7), (2, 20, 1030, 5),
                (1, 9, 2048, 3)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", _CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_every_instantiation_and_wide_windows(shape, rng, poison):
    require_backend("cuda", "cuda", "stem")
    from vqdna.kernels.cuda_launch import device_smem_optin, stem_cuda_unsupported

    b, length, d, width = shape
    reason = stem_cuda_unsupported(d, width, torch.float32, device_smem_optin(torch.device("cuda")))
    if reason is not None:
        pytest.skip(reason)
    ids, *params = make_inputs(b, length, d, width, rng, "cuda")
    want = truth(ids, *params)
    for dtype in OUT_DTYPES:
        got = stem(ids, *params, out_dtype=dtype, backend="cuda")
        assert dispatch.last_backend("stem") == "cuda"
        assert_stem_close(got, want, dtype)


@pytest.mark.cuda
def test_cuda_table_over_shared_memory(rng):
    """A [W, 5, D] table over the GPU's shared memory: the registered op and backend='cuda' raise
    saying so, and 'auto' takes another backend, which gets the right answer."""
    require_backend("cuda", "cuda", "stem")
    from vqdna.kernels.cuda_launch import device_smem_optin

    d = 2048
    width = device_smem_optin(torch.device("cuda")) // (5 * d * 4) + 1
    width += 1 - width % 2  # odd
    ids, *params = make_inputs(2, 9, d, width, rng, "cuda")
    with pytest.raises(RuntimeError, match="shared memory"):
        backend_op("stem", "cuda")(ids, *params, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: .*shared memory"):
        stem(ids, *params, backend="cuda")
    got = stem(ids, *params, backend="auto")
    assert dispatch.last_backend("stem") != "cuda"
    assert_stem_close(got, truth(ids, *params), torch.float32)
