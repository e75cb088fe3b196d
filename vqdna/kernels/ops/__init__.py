"""The op registry: one line per op. Each op lives in vqdna/kernels/ops/<op>/ (declaration, wrapper,
Triton kernel, bench cases) and csrc/ops/<op>/ (schemas, C++ and CUDA kernels); see registry.py and
docs/adding-an-op.md. The public functions are vqdna.kernels.<op>."""

from vqdna.kernels.ops import registry

DECLARATIONS = registry.register([
    "lookup",
    "hrq_quantize",
    "ema_stats",
    "kmeans",
    "stem",
    "convnext_block",
    "quantize",
    "sample_codes",
])
