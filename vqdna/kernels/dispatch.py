"""The single dispatch point: which backend runs an op for a device and dtype.

Backends: "cuda" (vqdna._C CUDA kernels), "triton" (Triton kernels; CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), "native" (vqdna._C C++ CPU kernels), "reference" (reference.py).
`backend="auto"` takes the fastest available for the device and dtype; the environment variable
VQDNA_BACKEND replaces "auto". An explicitly requested backend that cannot run raises: nothing
falls back silently. Every call records the backend that ran (`last_backend(op)`) and logs it at
DEBUG level on the "vqdna.kernels" logger.

Measured selection: "auto" follows backend_table.json (shipped beside this file; env
VQDNA_BACKEND_TABLE names another; regenerate with `vqdna bench --write-table`), which holds, per
device (type + name, e.g. "cpu" / "AMD EPYC", "cuda" / "NVIDIA H100 80GB HBM3"), the backend that won
each measured (op, dtype, N, K) point. A call takes the winner of the nearest measured point in
(log2 N, log2 K). Where the table has no entry for the device, op and dtype, or its winner cannot run
here, "auto" takes the generic order below (the documented default; the reason is logged at DEBUG).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from vqdna import _ext
from vqdna.kernels.compile_marks import assume_constant_result

logger = logging.getLogger("vqdna.kernels")

BACKENDS = ("cuda", "triton", "native", "reference")

# Preference order for "auto", fastest first, per device type: the default where the measured table
# (backend_table.json) has no entry.
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


def _why_unavailable(backend: str, device: torch.device, op: str = "lookup") -> Optional[str]:
    """None when `backend` can run `op` on tensors on `device`, else the reason it cannot."""
    return _availability(backend, torch.device(device).type, op)


@assume_constant_result  # torch.compile evaluates it once while tracing
def _availability(backend: str, device_type: str, op: str) -> Optional[str]:
    from vqdna.kernels.ops.registry import declarations, has_kernel

    device = torch.device(device_type)
    decl = declarations().get(op)
    if decl is None:
        return f"vqdna.kernels declares no op {op!r}"
    if backend in BACKENDS and backend not in decl.backends:  # its declaration names no such kernel
        return f"there is no {'Triton' if backend == 'triton' else backend} {op} kernel"
    if decl.reference is None:  # a composite runs where every op it uses runs
        reasons = (_availability(backend, device_type, used) for used in decl.uses)
        return next((r for r in reasons if r is not None), None)
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


# ---------------------------------------------------------------------------------------------
# The measured table. Nothing here runs at import: the file is read, and the device named, on the
# first "auto" call (then cached).

TABLE_ENV = "VQDNA_BACKEND_TABLE"
DEFAULT_TABLE_PATH = Path(__file__).with_name("backend_table.json")

_table: Optional[dict] = None
_choices: dict = {}
_device_names: dict = {}


def device_name(device: str | torch.device) -> str:
    """The name the table keys a device by: torch.cuda.get_device_name for a GPU, the CPU's model
    name (/proc/cpuinfo, else platform.processor()) for the CPU. Cached per device."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _device_names:
        if device.type == "cuda":
            _device_names[key] = torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
        elif device.type == "cpu":
            _device_names[key] = _cpu_model_name()
        else:
            _device_names[key] = device.type
    return _device_names[key]


def _cpu_model_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def table_device_key(device_type: str, name: str) -> str:
    return f"{device_type}/{name}"


def load_backend_table(path: str | os.PathLike | None = None) -> dict:
    """Read a backend table (JSON). Raises ValueError naming the file and the bad entry."""
    path = Path(path or os.environ.get(TABLE_ENV) or DEFAULT_TABLE_PATH)
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("devices"), dict):
        raise ValueError(f"{path}: a backend table is an object with a 'devices' object")
    for key, dev in table["devices"].items():
        for i, entry in enumerate(dev.get("entries", [])):
            missing = {"op", "dtype", "N", "K", "backend"} - set(entry)
            if missing or entry["backend"] not in BACKENDS:
                raise ValueError(f"{path}: devices[{key!r}].entries[{i}] needs op, dtype, N, K and a backend in {BACKENDS}: {entry}")
    return table


def backend_table() -> dict:
    """The table "auto" follows (loaded once; an absent default file is an empty table)."""
    global _table
    if _table is None:
        if os.environ.get(TABLE_ENV) or DEFAULT_TABLE_PATH.exists():
            _table = load_backend_table()
        else:
            _table = {"devices": {}}
    return _table


def set_backend_table(table: dict | str | os.PathLike | None) -> None:
    """Replace the table "auto" follows (a dict or a path); None re-reads the default on next use."""
    global _table
    _table = load_backend_table(table) if isinstance(table, (str, os.PathLike)) else table
    _choices.clear()


def _bucket(x) -> Optional[int]:
    # log2 size class; a symbolic size (dynamic shapes under torch.compile) has no class: it takes
    # the largest measured point rather than specialising the graph on its value.
    return int(x).bit_length() if isinstance(x, int) else None


@assume_constant_result  # torch.compile evaluates it once while tracing
def _table_choice(op: str, device_type: str, device_index: int, dtype: str, n_bucket: int, k_bucket: int) -> str:
    """The measured winner for this call's nearest (N, K) point, or "" when the table has none."""
    key = (op, device_type, device_index, dtype, n_bucket, k_bucket)
    if key in _choices:
        return _choices[key]
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    name = device_name(device)
    dev = backend_table()["devices"].get(table_device_key(device_type, name))
    entries = [e for e in (dev or {}).get("entries", []) if e["op"] == op and e["dtype"] == dtype]
    if not entries:
        reason = "no entry for this device" if dev is None else f"no {op} {dtype} entry"
        logger.debug("%s: measured table: %s (%s %r); using the default order", op, reason, device_type, name)
        choice = ""
    else:
        nb = None if n_bucket < 0 else n_bucket
        kb = None if k_bucket < 0 else k_bucket
        top_n = max(int(e["N"]) for e in entries).bit_length()
        top_k = max(int(e["K"]) for e in entries).bit_length()

        def distance(e):
            dn = abs(int(e["N"]).bit_length() - (top_n if nb is None else nb))
            dk = abs(int(e["K"]).bit_length() - (top_k if kb is None else kb))
            return (dn + dk, -int(e["N"]), -int(e["K"]))  # ties: the larger measured problem

        best = min(entries, key=distance)
        choice = best["backend"]
        logger.debug("%s: measured table %r: %s (nearest point N=%s K=%s)", op, name, choice, best["N"], best["K"])
    _choices[key] = choice
    return choice


def _auto(op: str, device: torch.device, dtype: torch.dtype, size, why_not=None) -> str:
    def reason_against(backend):
        reason = _why_unavailable(backend, device, op)
        return reason if reason is not None or why_not is None else why_not(backend)

    n, k = size if size is not None else (None, None)
    nb, kb = _bucket(n), _bucket(k)
    measured = _table_choice(
        op, device.type, -1 if device.index is None else device.index, str(dtype).replace("torch.", ""),
        -1 if nb is None else nb, -1 if kb is None else kb,
    )
    if measured:
        reason = reason_against(measured)
        if reason is None:
            return measured
        if not torch.compiler.is_compiling():
            logger.debug("%s: measured winner %s cannot run here (%s); using the default order", op, measured, reason)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    for b in (*order, "reference"):
        reason = reason_against(b)
        if reason is None:
            return b
        if why_not is not None and not torch.compiler.is_compiling() and _why_unavailable(b, device, op) is None:
            logger.debug("%s: skipping %s for this call: %s", op, b, reason)
    raise AssertionError("the reference backend runs everything")


def select_backend(
    op: str, requested: Optional[str], device: torch.device, dtype: torch.dtype, size: Optional[tuple] = None,
    why_not: Optional[Callable[[str], Optional[str]]] = None,
) -> str:
    """Resolve `requested` ("auto", None or a backend name) for one call of `op` and record it.

    size: (N, K) of the call (rows, codes) for the measured table; None takes its largest point.
    why_not: backend -> None, or why that backend cannot run this call's shape (e.g. the CUDA stem's
    shared-memory table); "auto" skips such a backend (logged at DEBUG), an explicit request raises."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        requested = os.environ.get("VQDNA_BACKEND", "auto").lower() or "auto"
    if requested == "auto":
        if dtype == torch.float64:
            chosen = "reference"  # only the spec computes in float64
        else:
            chosen = _auto(op, torch.device(device), dtype, size, why_not)
    else:
        reason = _why_unavailable(requested, device, op)
        if reason is None and why_not is not None:
            reason = why_not(requested)
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
