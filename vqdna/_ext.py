"""Loads the compiled extension vqdna._C once; the package works without it (reference/Triton paths)."""

import logging
import warnings

logger = logging.getLogger("vqdna")

_C = None
_error = None
try:
    from vqdna import _C  # noqa: F401  (registers the torch.ops.vqdna.* native/CUDA ops)
except ImportError as exc:  # pure-Python install, or the build failed
    _error = exc
    warnings.warn(
        "vqdna: the compiled extension vqdna._C is not available "
        f"({exc}); native/CUDA backends are disabled. Build it with "
        "`pip install --no-build-isolation -e .` after installing torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    """True when vqdna._C imported (the native CPU ops are registered)."""
    return _C is not None


def cuda_ops_available() -> bool:
    """True when vqdna._C was compiled with its CUDA ops."""
    return _C is not None and bool(_C.built_with_cuda())


def extension_error():
    """The ImportError that kept vqdna._C from loading, or None."""
    return _error


def native_search_stats():
    """What the last native (CPU) lookup / quantize call did: {"search": "bf16" | "exact",
    "rows_screened", "rows_exact", "candidates"} (rows of z settled by the bf16 screen and its exact
    re-check of `candidates` codes in all, or by the exact float32 search); None without vqdna._C.
    Env VQDNA_NATIVE_SEARCH = auto | exact | bf16 chooses (csrc/common/cpu_bf16_screen.h)."""
    return None if _C is None else dict(_C.native_search_stats())


def bf16_screen_supported() -> bool:
    """True when the native lookup / quantize can run the bf16-screened search here (AVX512_BF16)."""
    return _C is not None and bool(_C.bf16_screen_supported())
