"""vqdna: fast learned genome vocabularies (VQ-VAE codebooks and Hierarchical Residual Quantization).

`import vqdna` loads the kernels only. The model layer's names (`vqdna.VectorQuantizer`,
`vqdna.VQDNATokenizerModel`, `vqdna.VQDNAConfig`, ...: `vqdna.models.__all__`) are resolved on first use
(PEP 562), so `import vqdna.kernels` never pays for transformers (about 1.2 s to import). Importing
`vqdna.models.bert` (directly, or by touching one of its names such as `vqdna.VQDNAConfig`, or through
`vqdna.VQDNATokenizer`) registers model_type "vqdna" with the transformers Auto classes (AutoConfig,
AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification: no trust_remote_code);
`vqdna.models.tokenizer_model` registers "vqdna-tokenizer".
"""

import importlib

__version__ = "0.1.0"

from vqdna import kernels, models  # noqa: E402,F401  (models: a lazy package, free to import)

__all__ = ["kernels", "models", *models.__all__]


def __getattr__(name):
    if name in models.__all__:
        return getattr(models, name)
    if name == "data":  # reachable after a plain `import vqdna`, as when this imported the models eagerly
        return importlib.import_module("vqdna.data")
    raise AttributeError(f"module 'vqdna' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
