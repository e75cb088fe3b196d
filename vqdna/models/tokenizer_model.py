"""The VQDNA tokenizer (docs/design.md §1): ConvNeXt1d encoder -> VQ or HRQ quantizer -> ConvNeXt1d decoder,
as a transformers model (config.json + model.safetensors; AutoConfig/AutoModel type "vqdna-tokenizer").

Bundled tokenizers live in vqdna/assets/<name>/ and load by name:
`VQDNATokenizerModel.from_pretrained("vqdna-small")`; any other string is a local directory.
Loading never unpickles (safetensors only) and a config that does not match the weights is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from vqdna import kernels
from vqdna.kernels.reference import BASE_PAD_ID
from vqdna.models.convnext import ConvNeXt1dDecoder, ConvNeXt1dEncoder, base_mask
from vqdna.models.quantizer import HRQuantizer, VectorQuantizer

__all__ = ["VQDNATokenizerConfig", "VQDNATokenizerModel", "VQDNATokenizerOutput", "bundled_tokenizers", "ASSETS_DIR"]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Named configurations. vqdna-base is the paper's (docs/design.md §1). vqdna-small trains on a 2-core CPU in
# minutes: D=64, 4 blocks, taps after blocks 2 and 4, level sizes 2^b * K0 with K0 = 16.
NAMED_CONFIGS = {
    "vqdna-base": dict(dim=384, depth=6, quantizer="hrq", taps=(3, 6), codebook_sizes=(64, 512)),
    "vqdna-base-vq": dict(dim=384, depth=6, quantizer="vq", taps=(6,), codebook_sizes=(512,)),
    "vqdna-small": dict(dim=64, depth=4, quantizer="hrq", taps=(2, 4), codebook_sizes=(64, 256)),
}


def bundled_tokenizers() -> list[str]:
    """Names of the tokenizers shipped in vqdna/assets/ (directories holding config.json + weights)."""
    if not os.path.isdir(ASSETS_DIR):
        return []
    return sorted(
        n for n in os.listdir(ASSETS_DIR) if os.path.isfile(os.path.join(ASSETS_DIR, n, WEIGHTS_NAME))
    )


class VQDNATokenizerConfig(PretrainedConfig):
    """Tokenizer hyper-parameters. `taps` are 1-based block numbers whose outputs are quantised (one
    per codebook; the last is `depth`); quantizer "vq" takes one codebook, "hrq" one per tap.
    commitment_weight defaults to beta = 0.5 (VQ, Eq. 3) or 0.9 (HRQ, Eq. 8)."""

    model_type = "vqdna-tokenizer"
    # The fields that, for given weights, change what encode() returns (encoder shape, quantizer,
    # taps, codebooks; the halo follows from them). With the weights' sha256 they are the tokenizer's
    # identity for token files; the others (EMA decay, commitment weight, k-means init...) only train.
    code_keys = ("model_type", "dim", "depth", "stem_kernel", "kernel_size", "mlp_ratio", "quantizer", "taps", "codebook_sizes")

    def __init__(
        self,
        dim: int = 384,
        depth: int = 6,
        stem_kernel: int = 5,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        quantizer: str = "hrq",
        taps: Sequence[int] = (3, 6),
        codebook_sizes: Sequence[int] = (64, 512),
        commitment_weight: Optional[float] = None,
        decay: float = 0.99,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 2.0,
        layer_scale_init: float = 1e-6,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        **kwargs,
    ):
        if quantizer not in ("vq", "hrq"):
            raise ValueError(f"VQDNATokenizerConfig: quantizer must be 'vq' or 'hrq', got {quantizer!r}")
        taps, codebook_sizes = tuple(int(t) for t in taps), tuple(int(k) for k in codebook_sizes)
        if len(taps) != len(codebook_sizes):
            raise ValueError(f"VQDNATokenizerConfig: {len(taps)} taps {taps} but {len(codebook_sizes)} codebook sizes {codebook_sizes}")
        if quantizer == "vq" and len(taps) != 1:
            raise ValueError(f"VQDNATokenizerConfig: quantizer 'vq' takes one tap and one codebook, got taps {taps}")
        if taps and taps[-1] != depth:
            raise ValueError(f"VQDNATokenizerConfig: the last tap must be depth={depth}, got taps {taps}")
        self.dim, self.depth = int(dim), int(depth)
        self.stem_kernel, self.kernel_size, self.mlp_ratio = int(stem_kernel), int(kernel_size), int(mlp_ratio)
        self.quantizer, self.taps, self.codebook_sizes = quantizer, list(taps), list(codebook_sizes)
        if commitment_weight is None:
            commitment_weight = 0.5 if quantizer == "vq" else 0.9
        self.commitment_weight = float(commitment_weight)
        self.decay, self.eps = float(decay), float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.layer_scale_init = float(layer_scale_init)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        super().__init__(**kwargs)

    @classmethod
    def named(cls, name: str, **overrides) -> "VQDNATokenizerConfig":
        """A named configuration ("vqdna-base", "vqdna-base-vq", "vqdna-small"), fields overridable."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown tokenizer config {name!r}; named configs: {sorted(NAMED_CONFIGS)}")
        return cls(**{**NAMED_CONFIGS[name], **overrides})


@dataclass
class VQDNATokenizerOutput(ModelOutput):
    """loss = recon_loss + commit_loss (scalars, float32); logits [B, L, 5]; codes [B, L, n_levels]
    int64 (-1 at masked-out positions)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    codes: Optional[torch.Tensor] = None
    recon_loss: Optional[torch.Tensor] = None
    commit_loss: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _quiet_progress():
    """transformers draws a progress bar per save/load; a tokenizer is one small file."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class VQDNATokenizerModel(PreTrainedModel):
    """The VQ-VAE / HRQ tokenizer.

    forward(ids [B, L] int (0..4 = A C G T N, 5 = pad), mask [B, L] bool = None (default ids < 5))
    -> VQDNATokenizerOutput (.loss = CE over real bases + weighted commitment loss, .logits, .codes,
    .recon_loss, .commit_loss). In training mode the codebooks are EMA-updated by the quantizer.
    encode(ids, mask=None) -> codes [B, L, n_levels] int32 (no grad, no codebook update; -1 where
    masked). Codes at position t depend on bases t - R .. t + R only, R = `receptive_radius`; runs of
    bases `isolation_gap` masked positions apart in one row are coded as each alone.
    """

    config_class = VQDNATokenizerConfig
    base_model_prefix = "vqdna_tokenizer"
    main_input_name = "ids"

    def __init__(self, config: VQDNATokenizerConfig):
        super().__init__(config)
        c = config
        self.encoder = ConvNeXt1dEncoder(c.dim, c.depth, c.stem_kernel, c.kernel_size, c.mlp_ratio, c.taps, c.layer_scale_init)
        common = dict(
            decay=c.decay, eps=c.eps, commitment_weight=c.commitment_weight, kmeans_init=c.kmeans_init,
            kmeans_iters=c.kmeans_iters, threshold_ema_dead_code=c.threshold_ema_dead_code,
        )
        if c.quantizer == "vq":
            self.quantizer = VectorQuantizer(c.dim, c.codebook_sizes[0], **common)
        else:
            self.quantizer = HRQuantizer(c.dim, c.codebook_sizes, **common)
        self.decoder = ConvNeXt1dDecoder(c.dim, c.depth, c.kernel_size, c.mlp_ratio, c.layer_scale_init)
        self._tokenizer_sha256: Optional[str] = None
        self.post_init()

    def _init_weights(self, module):
        # The modules initialise themselves (PyTorch defaults, layer scale, codebooks); loading
        # replaces every tensor, and a missing one is an error (from_pretrained).
        pass

    # -- properties of the contract ------------------------------------------------------------
    @property
    def receptive_radius(self) -> int:
        return self.encoder.receptive_radius

    @property
    def isolation_gap(self) -> int:
        """Masked positions that keep two runs of bases in one row from seeing each other
        (ConvNeXt1dEncoder.isolation_gap; quantization is per position)."""
        return self.encoder.isolation_gap

    @property
    def n_levels(self) -> int:
        return len(self.config.codebook_sizes)

    @property
    def codebooks(self) -> list[torch.Tensor]:
        """The codebooks, one [K_l, dim] float32 tensor per level."""
        if isinstance(self.quantizer, VectorQuantizer):
            return [self.quantizer.codebook]
        return self.quantizer.codebooks

    @property
    def tokenizer_sha256(self) -> Optional[str]:
        """sha256 (hex) of the model.safetensors this model was loaded from or last saved to (the
        tokenizer's identity); None for a model never saved nor loaded."""
        return self._tokenizer_sha256

    def usage(self) -> list[dict]:
        """Per level {"used_fraction", "perplexity"} over recent training batches."""
        u = self.quantizer.usage()
        return [u] if isinstance(u, dict) else u

    # -- compute -------------------------------------------------------------------------------
    def _quantize(self, zs: list[torch.Tensor], keep: torch.Tensor):
        """(zhat [B, L, D], codes [B, L, n_levels] int64, weighted commitment loss)."""
        if isinstance(self.quantizer, VectorQuantizer):
            zhat, codes, loss = self.quantizer(zs[-1], mask=keep)
            codes = codes[..., None]
        else:
            zhat, codes, loss = self.quantizer(zs, mask=keep)
            codes = codes.movedim(0, -1)
        return zhat, codes.masked_fill(~keep[..., None], -1), loss

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, **kwargs) -> VQDNATokenizerOutput:
        keep = base_mask(ids, mask)
        zs = self.encoder(ids, keep)
        zhat, codes, commit_loss = self._quantize(zs, keep)
        logits = self.decoder(zhat, keep)
        targets = torch.where(keep, ids.long(), -100)
        recon_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if not bool(keep.any()):
            recon_loss = logits.sum() * 0.0  # CE over no positions is NaN; an all-pad batch costs nothing
        return VQDNATokenizerOutput(
            loss=recon_loss + commit_loss, logits=logits, codes=codes, recon_loss=recon_loss, commit_loss=commit_loss
        )

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes [B, L, n_levels] int32 (eval semantics: no EMA update, no grad; -1 where masked)."""
        keep = base_mask(ids, mask)
        zs = self.encoder(ids, keep)
        dtype = zs[0].dtype
        books = [c.to(dtype) for c in self.codebooks]
        if isinstance(self.quantizer, VectorQuantizer):
            codes, dist = kernels.lookup(zs[-1], books[0])
            codes = codes[..., None]
        else:
            codes = kernels.hrq_quantize(zs, books, codes_only=True).movedim(0, -1)  # no zhat_levels written
        return codes.to(torch.int32).masked_fill(~keep[..., None], -1)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """config.json + model.safetensors (never pickle); sets tokenizer_sha256 to the new file's."""
        kwargs["safe_serialization"] = True
        with _quiet_progress():
            result = super().save_pretrained(save_directory, *args, **kwargs)
        self._tokenizer_sha256 = _sha256_file(os.path.join(save_directory, WEIGHTS_NAME))
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a bundled tokenizer by name (see `bundled_tokenizers()`) or a local directory holding
        config.json + model.safetensors. Missing, unexpected or mismatched tensors raise ValueError."""
        name = os.fspath(pretrained_model_name_or_path)
        path = os.path.join(ASSETS_DIR, name) if name in bundled_tokenizers() else name
        weights, config = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
        for needed in (weights, config):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f"no tokenizer at {name!r}: {needed} does not exist (a tokenizer directory holds {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME}; bundled tokenizers: {bundled_tokenizers()})"
                )
        # A damaged config.json or weights file: say which file, not a library traceback.
        try:
            with open(config) as f:
                json.load(f)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{config}: unreadable ({exc})") from exc
        try:
            with safe_open(weights, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights}: unreadable ({exc})") from exc
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.update(use_safetensors=True, local_files_only=True)
        try:
            with _quiet_progress():
                model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except SafetensorError as exc:  # damage past the header (a truncated tensor)
            raise ValueError(f"{weights}: unreadable ({exc})") from exc
        except RuntimeError as exc:  # transformers' size-mismatch error
            raise ValueError(f"{path}: the weights do not match {CONFIG_NAME}: {exc}") from exc
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"{path}: the weights do not match config.json: {problems}")
        model._tokenizer_sha256 = _sha256_file(weights)
        return (model, info) if want_info else model


AutoConfig.register(VQDNATokenizerConfig.model_type, VQDNATokenizerConfig)
AutoModel.register(VQDNATokenizerConfig, VQDNATokenizerModel)
