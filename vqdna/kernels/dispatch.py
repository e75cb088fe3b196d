"""The single dispatch point: which backend runs an op for a device and dtype.

Backends: "cuda" (vqdna._C CUDA kernels), "triton" (Triton kernels; CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), "native" (vqdna._C C++ CPU kernels), "reference" (reference.py).
`backend="auto"` takes the fastest available for the device and dtype; the environment variable
VQDNA_BACKEND replaces "auto". An explicitly requested backend that cannot run raises: nothing
falls back silently. Every call records the backend that ran (`last_backend(op)`) and logs it at
DEBUG level on the "vqdna.kernels" logger.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch

from vqdna import _ext

logger = logging.getLogger("vqdna.kernels")

BACKENDS = ("cuda", "triton", "native", "reference")

# Preference order for "auto", fastest first, per device type. Measured selection by op, dtype and
# size replaces this table when the benchmark suite regenerates it.
_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("native", "reference"),
}

_last: dict[str, str] = {}


def triton_available() -> bool:
    """Triton is importable (it runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Ops that have a kernel file per backend; an op missing here for a backend has no such kernel yet.
_TRITON_MODULES = {
    "lookup": "vqdna.kernels.triton.lookup",
    "hrq_quantize": "vqdna.kernels.triton.hrq_quantize",
    "ema_stats": "vqdna.kernels.triton.ema_update",
    "stem": "vqdna.kernels.triton.stem",
}


def _why_unavailable(backend: str, device: torch.device, op: str = "lookup") -> Optional[str]:
    """None when `backend` can run `op` on tensors on `device`, else the reason it cannot."""
    return _availability(backend, torch.device(device).type, op)


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing
def _availability(backend: str, device_type: str, op: str) -> Optional[str]:
    from vqdna.kernels.native import has_kernel

    device = torch.device(device_type)

    if backend == "reference":
        return None
    if backend == "native":
        if device.type != "cpu":
            return f"the native backend runs CPU tensors, got {device.type}"
        if not _ext.extension_available():
            return f"vqdna._C is not built ({_ext.extension_error()})"
        if not has_kernel(op, "native"):
            return f"this build of vqdna._C has no native {op} kernel (rebuild: pip install --no-build-isolation -e .)"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got {device.type}"
        if not _ext.cuda_ops_available():
            return "vqdna._C was built without its CUDA ops (install with a CUDA build of torch and nvcc)"
        if not has_kernel(op, "cuda"):
            return f"this build of vqdna._C has no CUDA {op} kernel"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if op not in _TRITON_MODULES or importlib.util.find_spec(_TRITON_MODULES[op]) is None:
            return f"there is no Triton {op} kernel"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
            return None
        return f"triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    return f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}"


def available_backends(device: str | torch.device = "cpu", op: str = "lookup") -> list[str]:
    """Backends that can run `op` on tensors on `device` in this process, fastest first."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    extra = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *extra) if _why_unavailable(b, device, op) is None]


def select_backend(op: str, requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """Resolve `requested` ("auto", None or a backend name) for one call of `op` and record it."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        requested = os.environ.get("VQDNA_BACKEND", "auto").lower() or "auto"
    if requested == "auto":
        if dtype == torch.float64:
            chosen = "reference"  # only the spec computes in float64
        else:
            order = _AUTO_ORDER.get(device.type, ("reference",))
            chosen = next(b for b in (*order, "reference") if _why_unavailable(b, device, op) is None)
    else:
        reason = _why_unavailable(requested, device, op)
        if reason is not None:
            raise RuntimeError(f"vqdna.kernels.{op}: backend {requested!r} cannot run here: {reason}")
        if dtype == torch.float64 and requested != "reference":
            raise TypeError(f"vqdna.kernels.{op}: float64 inputs run only on the reference backend")
        chosen = requested
    _last[op] = chosen
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
        logger.debug("%s: backend=%s device=%s dtype=%s", op, chosen, device, dtype)
    return chosen


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the most recent call of `op` in this process (None if never called)."""
    return _last.get(op)
