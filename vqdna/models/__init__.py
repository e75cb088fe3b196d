"""nn.Modules: the quantizers (and later the tokenizer and language models)."""

from vqdna.models.quantizer import HRQuantizer, VectorQuantizer

__all__ = [
    "HRQuantizer", "VectorQuantizer",
    "ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "VQDNATokenizerConfig", "VQDNATokenizerModel",
    "VQDNAConfig", "VQDNAModel", "VQDNAForMaskedLM", "VQDNAForSequenceClassification",
]

# The tokenizer pulls in transformers (seconds to import): load it on first use only.
_LAZY = {
    "ConvNeXt1dEncoder": "vqdna.models.convnext",
    "ConvNeXt1dDecoder": "vqdna.models.convnext",
    "VQDNATokenizerConfig": "vqdna.models.tokenizer_model",
    "VQDNATokenizerModel": "vqdna.models.tokenizer_model",
    "VQDNAConfig": "vqdna.models.bert",
    "VQDNAModel": "vqdna.models.bert",
    "VQDNAForMaskedLM": "vqdna.models.bert",
    "VQDNAForSequenceClassification": "vqdna.models.bert",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqdna.models' has no attribute {name!r}")
