"""cuda_launch: the CUDA launchers' host-side decisions, checked without a GPU (the C++ side is
checked against these in tests/build/test_cuda_compile.py), and the shape-aware choice of the stem's
backend by dispatch with a mocked device."""

import logging

import pytest
import torch

from vqdna.kernels import cuda_launch, dispatch
from vqdna.kernels.cuda_launch import SMEM_OPTIN, SMEM_PER_SM, ema_atomic_plan, mma_vec_loads, stem_cuda_unsupported
from vqdna.kernels.ops.stem.wrapper import select_stem_backend as _select_stem_backend

CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "d,width,arch,fits",
    [
        (384, 5, "sm_80", True),  # 38,400 B
        (384, 65, "sm_90", False),  # 499,200 B
        (2048, 5, "sm_80", False),  # 204,800 B > 166,912 B
        (2048, 5, "sm_90", True),  # 204,800 B <= 232,448 B
        (2048, 7, "sm_90", False),  # 286,720 B
        (1024, 9, "sm_80", False),  # 184,320 B
        (1024, 9, "sm_90", True),
        (1, 1023, "sm_80", True),
    ],
)
def test_stem_table_limit(d, width, arch, fits):
    need = 5 * width * d * 4
    reason = stem_cuda_unsupported(d, width, torch.float32, SMEM_OPTIN[arch])
    assert (reason is None) == fits
    if not fits:
        assert f"{need} bytes" in reason and str(SMEM_OPTIN[arch]) in reason


def test_stem_dim_width_and_dtype_limits():
    big = 1 << 30
    assert stem_cuda_unsupported(2048, 1, torch.bfloat16, big) is None
    assert "D in [1, 2048]" in stem_cuda_unsupported(2049, 1, torch.float32, big)
    assert "D in [1, 2048]" in stem_cuda_unsupported(0, 1, torch.float32, big)
    assert "W = 1025" in stem_cuda_unsupported(1, 1025, torch.float32, big)
    assert "W = 4" in stem_cuda_unsupported(1, 4, torch.float32, big)
    assert "float64" in stem_cuda_unsupported(8, 5, torch.float64, big)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device 0 on which the cuda, triton and reference backends can run, with the
    shared-memory limits of the architecture passed to the returned setter; no measured table."""
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    real = dispatch._why_unavailable

    def why_unavailable(backend, device, op="lookup"):
        if torch.device(device).type == "cuda" and backend in ("cuda", "triton", "reference"):
            return None
        return real(backend, device, op)

    monkeypatch.setattr(dispatch, "_why_unavailable", why_unavailable)
    monkeypatch.setitem(dispatch._device_names, ("cuda", 0), "Fake GPU")
    dispatch.set_backend_table({"devices": {}})

    def set_arch(arch):
        monkeypatch.setitem(cuda_launch._smem_limits, 0, (SMEM_OPTIN[arch], SMEM_PER_SM[arch]))

    yield set_arch
    dispatch.set_backend_table(None)


@pytest.mark.parametrize(
    "d,width,arch,want",
    [
        (384, 5, "sm_80", "cuda"),
        (2048, 5, "sm_80", "triton"),  # the table needs 204,800 B, an A100 has 166,912
        (2048, 5, "sm_90", "cuda"),
        (2048, 7, "sm_90", "triton"),
        (4096, 1, "sm_90", "triton"),  # D over the kernel's 2048
        (8, 1025, "sm_90", "triton"),  # W over the launcher's 1024
    ],
)
def test_auto_skips_the_cuda_stem_for_shapes_it_cannot_run(fake_gpu, caplog, d, width, arch, want):
    fake_gpu(arch)
    with caplog.at_level(logging.DEBUG, logger="vqdna.kernels"):
        got = _select_stem_backend("auto", CUDA0, d, width, torch.float32, torch.float32)
    assert got == want
    if want != "cuda":
        assert "skipping cuda for this call" in caplog.text


def test_explicit_cuda_stem_raises_with_the_reason(fake_gpu):
    fake_gpu("sm_80")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run here: .*204800 bytes of shared memory, over "
                                           r"this GPU's 166912 bytes per block"):
        _select_stem_backend("cuda", CUDA0, 2048, 5, torch.float32, torch.float32)
    assert _select_stem_backend("cuda", CUDA0, 384, 5, torch.bfloat16, torch.bfloat16) == "cuda"


def test_a_measured_cuda_winner_is_skipped_for_a_shape_it_cannot_run(fake_gpu, caplog):
    fake_gpu("sm_80")
    dispatch.set_backend_table({"devices": {dispatch.table_device_key("cuda", "Fake GPU"): {
        "entries": [{"op": "stem", "dtype": "float32", "N": 1024, "K": 1, "backend": "cuda"}]}}})
    with caplog.at_level(logging.DEBUG, logger="vqdna.kernels"):
        assert _select_stem_backend("auto", CUDA0, 2048, 5, torch.float32, torch.float32) == "triton"
    assert "measured winner cuda cannot run here" in caplog.text
    assert _select_stem_backend("auto", CUDA0, 256, 5, torch.float32, torch.float32) == "cuda"


def test_smem_limits_read_from_the_device(monkeypatch):
    class Props:
        shared_memory_per_block = 49152
        shared_memory_per_block_optin = 232448
        shared_memory_per_multiprocessor = 233472

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(cuda_launch, "_smem_limits", {})
    assert cuda_launch.smem_limits(3) == (232448, 233472)
    assert cuda_launch.device_smem_optin(torch.device("cuda", 3)) == 232448


# --- ema_stats fast mode: which path the launcher takes ---------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
def test_ema_large_codebooks_use_global_atomics(arch, dtype):
    """K = 65536 never fits a shared table (65536 x 17 floats > 227 KB): global atomics, vectorised
    when D and the pointers allow (float4 atomics on sm_90)."""
    plan = ema_atomic_plan(384, 65536, dtype, SMEM_PER_SM[arch], SMEM_OPTIN[arch])
    assert not plan.smem_table and plan.table_bytes == 0 and plan.vec
    assert plan.col_tiles * (1 << plan.group_log2) * (4 if dtype == torch.float32 else 8) >= 384
    assert not ema_atomic_plan(384, 65536, dtype, SMEM_PER_SM[arch], SMEM_OPTIN[arch], sums_aligned16=False).vec
    assert not ema_atomic_plan(383, 65536, dtype, SMEM_PER_SM[arch], SMEM_OPTIN[arch]).vec


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ema_small_codebooks_use_a_shared_table_within_the_budget(arch):
    per_sm, optin = SMEM_PER_SM[arch], SMEM_OPTIN[arch]
    two_per_sm = per_sm // 2 - 2048
    for k in (1, 7, 512, 1000):
        plan = ema_atomic_plan(64, k, torch.float32, per_sm, optin)
        assert plan.smem_table and 0 < plan.table_bytes <= two_per_sm
    # The largest K with a 4-lane (16-column) float32 table in the opt-in budget, and one more.
    k_max = optin // (17 * 4)
    assert ema_atomic_plan(64, k_max, torch.float32, per_sm, optin).smem_table
    assert not ema_atomic_plan(64, k_max + 1, torch.float32, per_sm, optin).smem_table
    # A shared table never needs the sums aligned for vector loads.
    assert ema_atomic_plan(64, 7, torch.bfloat16, per_sm, optin, sums_aligned16=False).vec


def test_ema_group_width_covers_d_with_fewest_padded_columns():
    assert cuda_launch.ema_group_log2(1, 2) == 0
    assert cuda_launch.ema_group_log2(384, 3) == 4  # 16 lanes x 8 = 128 columns, 3 tiles, no padding
    assert cuda_launch.ema_group_log2(384, 2) == 5  # 32 lanes x 4 = 128 columns
    assert cuda_launch.ema_group_log2(4096, 3) == 5  # at most 32 lanes


def test_mma_vector_loads_need_d_multiple_of_8_and_aligned_inputs():
    assert mma_vec_loads(torch.bfloat16, 64, True) and mma_vec_loads(torch.float16, 8, True)
    assert not mma_vec_loads(torch.bfloat16, 64, False)  # the misaligned-pointer fallback
    assert not mma_vec_loads(torch.bfloat16, 60, True)
    assert not mma_vec_loads(torch.float32, 64, True)
