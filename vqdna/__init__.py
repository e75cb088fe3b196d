"""vqdna: fast learned genome vocabularies (VQ-VAE codebooks and Hierarchical Residual Quantization)."""

__version__ = "0.1.0"

from vqdna import kernels  # noqa: E402,F401
from vqdna.models.quantizer import HRQuantizer, VectorQuantizer  # noqa: E402

__all__ = ["HRQuantizer", "VectorQuantizer", "kernels", "ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "VQDNATokenizerConfig", "VQDNATokenizerModel"]

_LAZY_MODELS = {"ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "VQDNATokenizerConfig", "VQDNATokenizerModel"}


def __getattr__(name):
    # The tokenizer model imports transformers: resolved on first use, not at `import vqdna`.
    if name in _LAZY_MODELS:
        from vqdna import models

        return getattr(models, name)
    raise AttributeError(f"module 'vqdna' has no attribute {name!r}")
