"""vqdna.kernels.triton.common: tile declarations and their pruning per GPU, the autotune size class,
the device guard, device integer tensors without a host copy. No GPU needed (the CUDA facts are
passed in or mocked)."""

import contextlib

import pytest
import torch

from vqdna.kernels.triton import common
from vqdna.kernels.triton.common import SHARED_LIMIT_BYTES, Tile, allowed, declared_for, size_class

triton = pytest.importorskip("triton")


def test_size_class_is_the_power_of_two_class():
    assert [size_class(n) for n in (0, 1, 2, 3, 4, 7, 8, 1 << 20, (1 << 20) + 1)] == [1, 1, 2, 2, 3, 3, 4, 21, 21]


def test_device_guard_sets_the_tensors_device():
    guard = common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without a GPU; entered only on one
    assert isinstance(common.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_int_tensor_on_builds_values_without_torch_tensor(monkeypatch):
    assert torch.equal(common.int_tensor_on([0, 64, 576], torch.device("cpu")), torch.tensor([0, 64, 576], dtype=torch.int32))

    # Off the CPU no torch.tensor(list, device=...) (a pageable host copy: a sync) may run.
    def no_host_copy(*args, **kwargs):
        raise AssertionError("torch.tensor called: a host-to-device copy")

    monkeypatch.setattr(torch, "tensor", no_host_copy)
    out = common.int_tensor_on([0, 64, 576], torch.device("meta"))
    assert out.shape == (3,) and out.dtype == torch.int32 and out.device.type == "meta"


def _estimate(tile, dtype_bytes):
    return common.pipelined_shared_bytes(tile, dtype_bytes)


def test_allowed_applies_dtype_arch_evenness_and_shared_limit():
    big = Tile(256, 128, 64, 8, 2)  # float32 estimate: 2 stages * 384 rows * 64 * 4 B = 196,608 B
    assert not allowed(big, "fp32", 384, 80, SHARED_LIMIT_BYTES[80], _estimate)  # over sm_80's 166,912 B
    assert allowed(big, "fp32", 384, 90, SHARED_LIMIT_BYTES[90], _estimate)
    assert allowed(big, "bf16", 384, 80, SHARED_LIMIT_BYTES[80], _estimate)
    half_only = Tile(128, 128, 64, 8, 3, common.HALF, even_d_only=True, archs=(90,))
    assert allowed(half_only, "bf16", 384, 90, SHARED_LIMIT_BYTES[90], _estimate)
    assert not allowed(half_only, "fp32", 384, 90, SHARED_LIMIT_BYTES[90], _estimate)  # dtype
    assert not allowed(half_only, "bf16", 100, 90, SHARED_LIMIT_BYTES[90], _estimate)  # D % 64 != 0
    assert not allowed(half_only, "bf16", 384, 80, SHARED_LIMIT_BYTES[80], _estimate)  # arch


def test_declared_for_rounds_down_to_a_known_arch():
    t = Tile(1, 1, 1, 1, 1, archs=(90,))
    assert declared_for(t, 90) and declared_for(t, 100) and not declared_for(t, 80) and not declared_for(t, 89)
    assert declared_for(Tile(1, 1, 1, 1, 1), 75)


@pytest.mark.parametrize("module", ["lookup", "hrq_quantize"])
def test_prune_keeps_what_the_declaration_allows(module, monkeypatch):
    """The autotuner's prune hook on a (mocked) sm_80 GPU: only tiles declared for sm_80, the dtype and
    the D; none over the shared-memory limit."""
    import importlib

    mod = importlib.import_module(f"vqdna.kernels.ops.{module}.triton_kernel")
    configs = [t.config() for t in mod.TILES]

    class Props:
        shared_memory_per_block_optin = SHARED_LIMIT_BYTES[80]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(common, "arch_of", lambda device: 80)
    monkeypatch.setattr(common, "_is_cuda", lambda t: True)
    arg = "z_ptr" if module == "lookup" else "z0_ptr"
    prune = common.prune_for_device(arg, mod.shared_bytes, mod.TILES)
    for dtype, d in [(torch.bfloat16, 384), (torch.bfloat16, 100), (torch.float32, 384)]:
        kept = prune(configs, {arg: torch.empty(1, d, dtype=dtype), "D": d})
        tiles = [common.tile_of(c) for c in kept]
        assert tiles, (dtype, d)
        for t in tiles:
            declared = next(x for x in mod.TILES if common.astuple_of(x.config()) == common.astuple_of(t.config()))
            assert allowed(declared, common.DTYPE_NAMES[dtype], d, 80, SHARED_LIMIT_BYTES[80], mod.shared_bytes)
        # Everything the declaration allows is kept.
        expect = [x for x in mod.TILES if allowed(x, common.DTYPE_NAMES[dtype], d, 80, SHARED_LIMIT_BYTES[80], mod.shared_bytes)]
        assert len(kept) == len(expect)


@pytest.mark.parametrize("module", ["lookup", "hrq_quantize"])
def test_autotune_key_includes_the_row_class(module):
    import importlib

    kernel = getattr(importlib.import_module(f"vqdna.kernels.ops.{module}.triton_kernel"), f"_{module.split('_')[0]}_kernel")
    assert "N_CLASS" in kernel.keys  # tuned per size class of N, not once at the first call's N


def test_triton_hrq_launcher_makes_no_host_tensor():
    """The offsets table is built on the device (common.int_tensor_on), not copied from the host."""
    import inspect

    from vqdna.kernels.ops.hrq_quantize import triton_kernel

    src = inspect.getsource(triton_kernel)
    assert "torch.tensor(" not in src and "int_tensor_on(" in src


def test_ema_path_threshold_on_a_gpu():
    from vqdna.kernels.ops.ema_stats import triton_kernel as ema_update

    threshold = ema_update.GPU_TILES[4]
    assert threshold == 1 << 15
    # path() follows the tiles of this process (the interpreter's under TRITON_INTERPRET=1).
    low = ema_update._SORTED_MIN_ROWS
    assert ema_update.path(low - 1, deterministic=False) == "direct"
    assert ema_update.path(low, deterministic=False) == "sorted"
    assert ema_update.path(1, deterministic=True) == "sorted"
