"""vqdna: fast learned genome vocabularies (VQ-VAE codebooks and Hierarchical Residual Quantization)."""

__version__ = "0.1.0"

from vqdna import kernels  # noqa: E402,F401
from vqdna.models.quantizer import HRQuantizer, VectorQuantizer  # noqa: E402

__all__ = ["HRQuantizer", "VectorQuantizer", "kernels"]
