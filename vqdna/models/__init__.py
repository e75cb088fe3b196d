"""The model layer: the quantizer modules, the ConvNeXt1d tokenizer VQ-VAE and the transformers models.

Every name is resolved on first use (PEP 562): importing this package is free, and only the modules a
caller touches are imported (the tokenizer and the transformers models import transformers, about 1.2 s).
"""

import importlib

# public name -> module that defines it
_LAZY = {
    "HRQuantizer": "vqdna.models.quantizer",
    "VectorQuantizer": "vqdna.models.quantizer",
    "ConvNeXt1dEncoder": "vqdna.models.convnext",
    "ConvNeXt1dDecoder": "vqdna.models.convnext",
    "VQDNATokenizerConfig": "vqdna.models.tokenizer_model",
    "VQDNATokenizerModel": "vqdna.models.tokenizer_model",
    "VQDNAConfig": "vqdna.models.bert",
    "VQDNAModel": "vqdna.models.bert",
    "VQDNAForMaskedLM": "vqdna.models.bert",
    "VQDNAForSequenceClassification": "vqdna.models.bert",
    "VQDNATokenizer": "vqdna.models.hf_tokenizer",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqdna.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
