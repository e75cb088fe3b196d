"""nn.Modules: the quantizers (and later the tokenizer and language models)."""

from vqdna.models.quantizer import HRQuantizer, VectorQuantizer

__all__ = ["HRQuantizer", "VectorQuantizer"]
