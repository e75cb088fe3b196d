"""Shared fixtures. Nothing here queries a device at import or collection time."""

import os

import pytest
import torch

# (backend, device) pairs every op is tested on; CUDA pairs carry the `cuda` marker.
CPU_BACKENDS = [("reference", "cpu"), ("native", "cpu"), ("triton", "cpu")]
CUDA_BACKENDS = [("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def _pairs(op):
    """The (backend, device) pairs that test `op`: the backends its declaration has (all for op=None)."""
    pairs = CPU_BACKENDS + CUDA_BACKENDS
    if op is None:
        return pairs
    from vqdna.kernels.ops.registry import declaration

    declared = declaration(op).backends
    return [(b, d) for b, d in pairs if b in declared]


def backend_params(op=None):
    """pytest params (backend, device) for every backend of `op` (vqdna/kernels/ops/<op>/declaration.py)."""
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.cuda] if d == "cuda" else []) for b, d in _pairs(op)]


def backend_case_params(cases, interpreter_too_big, op=None):
    """pytest params (backend, device, *case) for every backend of `op` and every case tuple; Triton-on-CPU
    cases for which interpreter_too_big(*case) holds carry `slow` (the interpreter is ~1000x slower)."""
    params = []
    for b, d in _pairs(op):
        for case in cases:
            marks = [pytest.mark.cuda] if d == "cuda" else []
            if b == "triton" and d == "cpu" and interpreter_too_big(*case):
                marks.append(pytest.mark.slow)
            ids = "-".join(str(v)[6:] if isinstance(v, torch.dtype) else str(v) for v in case)
            params.append(pytest.param(b, d, *case, marks=marks, id=f"{b}-{d}-{ids}"))
    return params


def require_backend(backend: str, device: str, op: str = "lookup") -> None:
    """Skip (with the reason) when `backend` cannot run `op` on `device` here.

    The native CPU backend is never skipped: a missing extension is a failed build, unless
    VQDNA_ALLOW_NO_EXT=1 says this is a deliberate pure-Python install.
    """
    from vqdna.kernels import dispatch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = dispatch._why_unavailable(backend, torch.device(device), op)
    if reason is None:
        return
    if backend == "native" and os.environ.get("VQDNA_ALLOW_NO_EXT") != "1":
        pytest.fail(f"native backend unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def poison():
    """Make every torch.empty (Python or C++) return NaN / INT_MAX so unwritten outputs show."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: fresh data per test, reproducible per test."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose data pointer is one element past a 16-byte boundary (element
    aligned, as the kernels require, but not 16-byte aligned: the CUDA kernels' scalar-load path)."""
    buf = torch.empty(t.numel() + 32, dtype=t.dtype, device=t.device)
    start = (-buf.data_ptr() % 16) // t.element_size() + 1
    out = buf[start : start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out
