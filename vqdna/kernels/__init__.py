"""vqdna kernels: every op has a pure-PyTorch reference (reference.py, the spec) and fast backends
chosen at one dispatch point (dispatch.py)."""

from vqdna.kernels import reference
from vqdna.kernels.dispatch import BACKENDS, available_backends, last_backend
from vqdna.kernels.ops import ema_stats, ema_update, hrq_quantize, kmeans, lookup, raise_on_nonfinite, stem

__all__ = [
    "BACKENDS",
    "available_backends",
    "ema_stats",
    "ema_update",
    "hrq_quantize",
    "kmeans",
    "last_backend",
    "lookup",
    "raise_on_nonfinite",
    "reference",
    "stem",
]
