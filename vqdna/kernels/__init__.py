"""vqdna kernels: every op has a pure-PyTorch reference (reference.py, the spec) and fast backends
chosen at one dispatch point (dispatch.py). Each op is one folder, ops/<op>/ (its declaration,
wrapper, Triton kernel and bench cases), registered by one line in ops/__init__.py."""

from vqdna.kernels import reference
from vqdna.kernels.dispatch import BACKENDS, available_backends, last_backend
from vqdna.kernels.ops.convnext_block.wrapper import convnext_block
from vqdna.kernels.ops.ema_stats.wrapper import ema_stats, ema_update
from vqdna.kernels.ops.hrq_quantize.wrapper import hrq_quantize
from vqdna.kernels.ops.kmeans.wrapper import kmeans
from vqdna.kernels.ops.lookup.wrapper import lookup, raise_on_nonfinite
from vqdna.kernels.ops.quantize.wrapper import quantize
from vqdna.kernels.ops.sample_codes.wrapper import sample_codes
from vqdna.kernels.ops.stem.wrapper import stem

__all__ = [
    "BACKENDS",
    "available_backends",
    "convnext_block",
    "ema_stats",
    "ema_update",
    "hrq_quantize",
    "kmeans",
    "last_backend",
    "lookup",
    "quantize",
    "raise_on_nonfinite",
    "reference",
    "sample_codes",
    "stem",
]
