"""vqdna: fast learned genome vocabularies (VQ-VAE codebooks and Hierarchical Residual Quantization)."""

__version__ = "0.1.0"

from vqdna import kernels  # noqa: E402,F401
from vqdna.models.quantizer import HRQuantizer, VectorQuantizer  # noqa: E402

# Registers model_type "vqdna" with the transformers Auto classes (AutoConfig, AutoModel,
# AutoModelForMaskedLM, AutoModelForSequenceClassification): from_pretrained needs no trust_remote_code.
# This imports transformers (a few seconds cold).
from vqdna.models.bert import (  # noqa: E402
    VQDNAConfig,
    VQDNAForMaskedLM,
    VQDNAForSequenceClassification,
    VQDNAModel,
)

__all__ = ["HRQuantizer", "VectorQuantizer", "kernels", "ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "VQDNATokenizerConfig", "VQDNATokenizerModel",
           "VQDNAConfig", "VQDNAModel", "VQDNAForMaskedLM", "VQDNAForSequenceClassification", "VQDNATokenizer"]

_LAZY_MODELS = {"ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "VQDNATokenizerConfig", "VQDNATokenizerModel"}


def __getattr__(name):
    # The tokenizer model imports transformers: resolved on first use, not at `import vqdna`.
    if name == "VQDNATokenizer":
        from vqdna.models.hf_tokenizer import VQDNATokenizer

        return VQDNATokenizer
    if name in _LAZY_MODELS:
        from vqdna import models

        return getattr(models, name)
    raise AttributeError(f"module 'vqdna' has no attribute {name!r}")
