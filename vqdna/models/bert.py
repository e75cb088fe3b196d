"""Stage 2 and 3 models: a BERT encoder with ALiBi attention over VQDNA code ids (transformers models).

Inputs are code ids per level, `input_ids` [B, L, n_levels] int64, plus `attention_mask` [B, L]
(1 / True = a real token). Level l holds a code in [0, K_l) of the stage-1 tokenizer's codebook l, or
a special id K_l + s with s in PAD 0, CLS 1, SEP 2, MASK 3 - the same s in every level of a position.
A code position is embedded as mean_l C_l[id_l] (the HRQ output embedding, docs/design.md §2.2) through the
frozen tokenizer codebooks (one [K_l, codebook_dim] float32 persistent buffer per level, `codebook_<l>`,
copied from the tokenizer and saved with the model), then projected to the hidden size; a special
position takes a learned [4, hidden] embedding instead. No position embeddings: attention carries the
ALiBi bias -slope_h * |i - j| (symmetric, as DNABERT-2), so lengths beyond training work.

Attention backends (config.attention_backend): "flash" (flash_attn varlen with alibi_slopes; CUDA,
fp16/bf16, right padding), "sdpa" (torch scaled_dot_product_attention with the bias as a float
attn_mask), "reference" (plain softmax(QK^T / sqrt(d) + bias + mask) V in float32, the spec for tests),
"auto" (flash when flash_attn is installed and the inputs qualify, else sdpa). An explicit backend
that cannot run raises instead of falling back.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from vqdna.data.alphabet import STRANDS  # config.classifier_strands: see VQDNAForSequenceClassification

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
PAD, CLS, SEP, MASK = range(4)
NUM_SPECIAL = len(SPECIAL_TOKENS)

# Module names LoRA adapts (peft matches them as name suffixes); unique to the encoder layers so the
# heads are never adapted by accident.
LORA_TARGET_MODULES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

# Named encoder sizes. "bert-base" is the paper's stage-2 model (~86 M parameters);
# "bert-tiny" is for CPU tests and examples.
NAMED_CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-mini": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "bert-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
}


POOLINGS = ("cls", "mean", "mean_layers", "mean_wide")  # config.classifier_pooling: see VQDNAForSequenceClassification
CLASSIFIER_WIDTH = 2048  # default config.classifier_width: the token layer of "mean_wide"
CLASSIFIER_WINDOW = 1  # default config.classifier_window: consecutive tokens the token layer of "mean_wide" reads


class VQDNAConfig(PretrainedConfig):
    """Configuration of the VQDNA masked LM / classifier (model_type "vqdna").

    codebook_sizes, codebook_dim: the stage-1 tokenizer's levels K_l and its code dimension D.
    tokenizer_sha256: identity of the tokenizer whose codebooks the model embeds through (or None).
    """

    model_type = "vqdna"

    def __init__(
        self,
        codebook_sizes=(64, 512),
        codebook_dim=384,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        attention_backend="auto",
        train_max_length=256,
        classifier_dropout=None,
        classifier_pooling="cls",
        classifier_strands="forward",
        classifier_width=CLASSIFIER_WIDTH,
        classifier_window=CLASSIFIER_WINDOW,
        tokenizer_sha256=None,
        **kwargs,
    ):
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.codebook_dim = int(codebook_dim)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.attention_backend = attention_backend
        self.train_max_length = train_max_length  # stage-2 window (tokens incl. CLS/SEP); ALiBi allows longer
        self.classifier_dropout = classifier_dropout
        self.classifier_pooling = classifier_pooling
        self.classifier_strands = classifier_strands
        self.classifier_width = int(classifier_width)  # the token layer of "mean_wide"
        self.classifier_window = int(classifier_window)  # its input: this many consecutive tokens' states
        self.tokenizer_sha256 = tokenizer_sha256
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        if classifier_pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling must be {'|'.join(POOLINGS)}, got {classifier_pooling!r}")
        if self.classifier_width < 1:
            raise ValueError(f"classifier_width must be >= 1, got {classifier_width}")
        if self.classifier_window < 1:
            raise ValueError(f"classifier_window must be >= 1, got {classifier_window}")
        if classifier_strands not in STRANDS:
            raise ValueError(f"classifier_strands must be {'|'.join(STRANDS)}, got {classifier_strands!r}")
        if attention_backend not in ("auto", "flash", "sdpa", "reference"):
            raise ValueError(f"attention_backend must be auto|flash|sdpa|reference, got {attention_backend!r}")

    @property
    def n_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def layers_size(self) -> int:
        """Width of a token's states of the embeddings and of every layer, concatenated."""
        return self.hidden_size * (self.num_hidden_layers + 1)

    @property
    def pooled_size(self) -> int:
        """Width of the classifier's pooled input: hidden_size ("cls", "mean"), layers_size ("mean_layers")
        or classifier_width ("mean_wide")."""
        return {"mean_layers": self.layers_size, "mean_wide": self.classifier_width}.get(self.classifier_pooling,
                                                                                         self.hidden_size)

    @classmethod
    def named(cls, name: str, **overrides) -> "VQDNAConfig":
        """A named size ("bert-base", "bert-small", "bert-mini", "bert-tiny") with overrides (e.g. codebook_sizes)."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown config {name!r}; named configs: {', '.join(NAMED_CONFIGS)}")
        return cls(**{**NAMED_CONFIGS[name], **overrides})


def special_ids(codebook_sizes, token: int) -> list[int]:
    """The per-level ids of special token `token` (PAD, CLS, SEP or MASK): K_l + token."""
    return [int(k) + token for k in codebook_sizes]


def default_attention_mask(input_ids, codebook_sizes):
    """[B, L] bool: True where the token is not PAD (read from level 0 of input_ids [B, L, n_levels])."""
    return input_ids[..., 0] != int(codebook_sizes[0]) + PAD


def build_inputs(codes_list, codebook_sizes, pad_to_multiple_of=None, pad_to=None):
    """Wrap each code sequence in CLS ... SEP and right-pad with PAD.

    codes_list: sequences of codes, each [n_i, n_levels] (any integer dtype, numpy or torch).
    Returns input_ids [B, L, n_levels] int64 and attention_mask [B, L] int64 with
    L = max(n_i) + 2 (at least pad_to; rounded up to pad_to_multiple_of).
    """
    n_levels = len(codebook_sizes)
    codes_list = [torch.as_tensor(c).long() for c in codes_list]
    for i, c in enumerate(codes_list):
        if c.dim() != 2 or c.shape[1] != n_levels:
            raise ValueError(f"codes[{i}] must be [length, {n_levels}], got shape {tuple(c.shape)}")
    length = max([c.shape[0] for c in codes_list], default=0) + 2
    length = max(length, pad_to or 0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.tensor(special_ids(codebook_sizes, PAD)).repeat(len(codes_list), length, 1)
    mask = torch.zeros(len(codes_list), length, dtype=torch.long)
    cls, sep = torch.tensor(special_ids(codebook_sizes, CLS)), torch.tensor(special_ids(codebook_sizes, SEP))
    for i, c in enumerate(codes_list):
        n = c.shape[0]
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = cls, c, sep
        mask[i, : n + 2] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Attention


def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """ALiBi head slopes [n_heads] float32 (Press et al.: 2^(-8h/n), interleaved for non powers of 2)."""

    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        slopes = powers(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = powers(closest) + powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """Symmetric ALiBi bias [H, L, L] float32: -slope_h * |i - j|."""
    pos = torch.arange(length, device=slopes.device, dtype=torch.float32)
    return -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()[None]


def reference_attention(q, k, v, slopes, attention_mask=None, dropout_p=0.0):
    """The spec: softmax(Q K^T / sqrt(d) + ALiBi + mask) V computed in float32.

    q, k, v [B, H, L, d]; slopes [H] float32; attention_mask [B, L] (True/1 = key kept) or None.
    Returns [B, H, L, d] in q's dtype.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1]) + alibi_bias(slopes.float(), q.shape[-2])
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ vf).to(q.dtype)


def sdpa_attention(q, k, v, slopes, attention_mask=None, dropout_p=0.0):
    """torch scaled_dot_product_attention with ALiBi + key padding as one additive float mask."""
    bias = alibi_bias(slopes.float(), q.shape[-2])[None]
    if attention_mask is not None:
        # A large finite negative, not -inf: a row with every key masked stays finite (uniform).
        neg = torch.finfo(q.dtype).min / 2
        bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], neg)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention(q, k, v, slopes, attention_mask=None, dropout_p=0.0):
    """flash_attn varlen with alibi_slopes (non-causal: -slope * |i - j|). Padding must be on the right
    (packed positions then equal the original ones). q, k, v [B, H, L, d] fp16/bf16 on CUDA."""
    from flash_attn import flash_attn_varlen_func

    b, h, length, d = q.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, length, dtype=torch.bool, device=q.device)
    mask = attention_mask.bool()
    seqlens = mask.sum(-1, dtype=torch.int32)
    cu = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    idx = mask.flatten().nonzero().squeeze(-1)

    def pack(t):  # [B, H, L, d] -> [total, H, d]
        return t.transpose(1, 2).reshape(b * length, h, d).index_select(0, idx)

    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, length, length, dropout_p=dropout_p,
                                 causal=False, alibi_slopes=slopes.float())
    full = out.new_zeros(b * length, h, d).index_copy_(0, idx, out)
    return full.view(b, length, h, d).transpose(1, 2)


def resolve_attention_backend(backend: str, q: torch.Tensor) -> str:
    """"auto" -> "flash" when flash_attn is installed and q is fp16/bf16 on CUDA, else "sdpa"."""
    flash_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available()
    if backend == "auto":
        return "flash" if flash_ok else "sdpa"
    if backend == "flash" and not flash_ok:
        raise RuntimeError("attention_backend='flash' needs flash_attn installed and fp16/bf16 CUDA inputs "
                           f"(got {q.dtype} on {q.device}, flash_attn installed: {flash_available()})")
    return backend


ATTENTION_BACKENDS = {"flash": flash_attention, "sdpa": sdpa_attention, "reference": reference_attention}


def alibi_attention(q, k, v, slopes, attention_mask=None, dropout_p=0.0, backend="auto"):
    """ALiBi self-attention [B, H, L, d] -> [B, H, L, d] on the chosen backend (see module docstring)."""
    return ATTENTION_BACKENDS[resolve_attention_backend(backend, q)](q, k, v, slopes, attention_mask, dropout_p)


# ---------------------------------------------------------------------------------------------
# Modules


class VQDNAEmbeddings(nn.Module):
    """Code ids [B, L, n_levels] -> [B, L, hidden]: frozen codebooks (mean over levels) + projection, or
    a learned special-token embedding; then LayerNorm and dropout."""

    def __init__(self, config: VQDNAConfig):
        super().__init__()
        # Frozen codebooks as persistent buffers: saved and loaded with the model, never trained, never
        # in an optimizer (a requires_grad=False parameter comes back trainable from from_pretrained).
        for l, k in enumerate(config.codebook_sizes):
            self.register_buffer(f"codebook_{l}", torch.randn(k, config.codebook_dim))
        self.n_levels = len(config.codebook_sizes)
        self.proj = nn.Linear(config.codebook_dim, config.hidden_size)
        self.special = nn.Embedding(NUM_SPECIAL, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def codebooks(self) -> list[torch.Tensor]:
        """The frozen codebooks, one [K_l, codebook_dim] float32 buffer per level."""
        return [getattr(self, f"codebook_{l}") for l in range(self.n_levels)]

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """ValueError naming the first bad (row, position) when an id is out of range or a position mixes
        codes and special ids across levels."""
        n_levels = len(self.codebooks)
        if input_ids.dim() != 3 or input_ids.shape[-1] != n_levels:
            raise ValueError(f"input_ids must be [batch, length, {n_levels}] code ids, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        sizes = torch.tensor([c.shape[0] for c in self.codebooks], device=input_ids.device)
        kind = torch.where(input_ids >= sizes, input_ids - sizes, -1)  # special token index, -1 for a code
        bad = (input_ids < 0) | (input_ids >= sizes + NUM_SPECIAL) | (kind != kind[..., :1])
        if bad.any():  # one host sync per forward; skipped under torch.compile
            row, pos, level = bad.nonzero()[0].tolist()
            raise ValueError(
                f"input_ids row {row}, position {pos}, level {level}: id {input_ids[row, pos, level].item()} is not "
                f"a code in [0, {sizes[level].item()}) or special id (one per level: K_l + 0..{NUM_SPECIAL - 1}) "
                f"consistent across levels; ids at that position: {input_ids[row, pos].tolist()}"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_ids(input_ids)
        code = sum(cb[input_ids[..., l].clamp(0, cb.shape[0] - 1)] for l, cb in enumerate(self.codebooks))
        code = code / len(self.codebooks)
        x = self.proj(code.to(self.proj.weight.dtype))
        k0 = self.codebooks[0].shape[0]
        special = input_ids[..., 0] >= k0
        sp = self.special((input_ids[..., 0] - k0).clamp(0, NUM_SPECIAL - 1))
        x = torch.where(special[..., None], sp, x)
        return self.dropout(self.LayerNorm(x))


class VQDNALayer(nn.Module):
    """Post-LN BERT layer with ALiBi self-attention. [B, L, hidden] -> [B, L, hidden]."""

    def __init__(self, config: VQDNAConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.attention_backend = config.attention_backend

    def forward(self, x, attention_mask, slopes):
        b, length, h = x.shape

        def heads(t):
            return t.view(b, length, self.num_heads, h // self.num_heads).transpose(1, 2)

        p = self.attention_dropout if self.training else 0.0
        a = alibi_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), slopes,
                            attention_mask, p, self.attention_backend)
        x = self.attn_norm(x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(b, length, h))))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class VQDNAPreTrainedModel(PreTrainedModel):
    config_class = VQDNAConfig
    base_model_prefix = "vqdna"
    lora_target_modules = LORA_TARGET_MODULES
    _no_split_modules = ["VQDNALayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VQDNAEmbeddings):
            # A model built without a tokenizer gets random unit-scale codebooks; set_codebooks() copies
            # the real ones. (init.* skips tensors already loaded from a checkpoint.)
            for cb in module.codebooks:
                init.normal_(cb, mean=0.0, std=1.0)  # skipped for a buffer loaded from a checkpoint

    def set_codebooks(self, codebooks) -> None:
        """Copy the stage-1 tokenizer's codebooks (list of [K_l, codebook_dim]) into the frozen embedding."""
        own = self.base_model.embeddings.codebooks
        if len(codebooks) != len(own):
            raise ValueError(f"tokenizer has {len(codebooks)} levels, the model {len(own)}")
        with torch.no_grad():
            for l, (dst, src) in enumerate(zip(own, codebooks)):
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"codebook level {l}: tokenizer shape {tuple(src.shape)}, model {tuple(dst.shape)}")
                dst.copy_(src)


class VQDNAModel(VQDNAPreTrainedModel):
    """The encoder: input_ids [B, L, n_levels], attention_mask [B, L] -> last_hidden_state [B, L, hidden].

    attention_mask defaults to "id is not PAD"."""

    def __init__(self, config: VQDNAConfig):
        super().__init__(config)
        self.embeddings = VQDNAEmbeddings(config)
        self.layers = nn.ModuleList([VQDNALayer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if attention_mask is None:
            attention_mask = default_attention_mask(input_ids, self.config.codebook_sizes)
        attention_mask = attention_mask.bool()
        x = self.embeddings(input_ids)
        # Slopes recomputed per call (H floats): no non-persistent buffer to re-create after loading.
        slopes = alibi_slopes(self.config.num_attention_heads, device=x.device)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, attention_mask, slopes)
            if hidden is not None:
                hidden.append(x)
        if not return_dict:
            return (x,) + ((tuple(hidden),) if hidden is not None else ())
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)


@dataclass
class VQDNAMaskedLMOutput(ModelOutput):
    """loss: mean over levels of the cross-entropy at labelled positions; logits: one [B, L, K_l] per level."""

    loss: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class VQDNAForMaskedLM(VQDNAPreTrainedModel):
    """Masked LM: one head per level predicts that level's code. labels [B, L, n_levels] int64 (-100 =
    not predicted); loss = mean over levels of each level's mean cross-entropy."""

    def __init__(self, config: VQDNAConfig):
        super().__init__(config)
        self.vqdna = VQDNAModel(config)
        self.transform = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), ACT2FN[config.hidden_act],
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        )
        self.decoders = nn.ModuleList([nn.Linear(config.hidden_size, k) for k in config.codebook_sizes])
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.vqdna(input_ids, attention_mask, output_hidden_states=output_hidden_states, return_dict=True)
        h = self.transform(out.last_hidden_state)
        logits = tuple(dec(h) for dec in self.decoders)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            # sum / count rather than a mean: a batch with no labelled position costs 0, not NaN
            losses = [F.cross_entropy(lg.flatten(0, 1).float(), labels[..., l].flatten(), ignore_index=-100,
                                      reduction="sum") / (labels[..., l] != -100).sum().clamp(min=1)
                      for l, lg in enumerate(logits)]
            loss = torch.stack(losses).mean()
        if not return_dict:
            return tuple(x for x in (loss, logits, out.hidden_states) if x is not None)
        return VQDNAMaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class VQDNAForSequenceClassification(VQDNAPreTrainedModel):
    """Sequence classification or regression from the CLS token (config.classifier_pooling "cls", as
    BERT), the mean over real tokens ("mean"), or those means of the embeddings and of every layer,
    concatenated ("mean_layers": width P = hidden * (layers + 1); the pooler is P x P, so meant for small
    models: 100 M head parameters at bert-base), or ("mean_wide") the mean over real tokens of a wide ReLU
    layer, `token_layer`, on each token's states of the embeddings and every layer (width P =
    config.classifier_width: a bag of nonlinear token features, where a linear read-out of mean states is a
    bag of linear ones; with config.classifier_window W > 1, on the states of each W consecutive tokens,
    concatenated: a bag of nonlinear features of windows, as a k-mer count is one of k bases); with config.classifier_strands "both", the mean of that
    feature over the sequence and its reverse complement (strand-symmetric: a binding site reads the same
    on either strand); then the pooler (dense + tanh) and the classifier:
    num_labels == 1 -> regression (MSE), integer labels -> single-label cross-entropy, float multi-hot
    labels -> multi-label BCE (config.problem_type overrides). labels [B]; logits [B, num_labels]."""

    # Loading a masked LM's checkpoint is the expected head swap: its MLM head (transform, decoders) is not
    # used and the pooler and classifier are new. Ignored here, so transformers prints no load report for
    # it; any other missing or unexpected tensor is still reported (and load_classifier raises).
    _keys_to_ignore_on_load_unexpected = [r"^transform\.", r"^decoders\."]
    _keys_to_ignore_on_load_missing = [r"^token_layer\.", r"^pooler\.", r"^classifier\."]

    def __init__(self, config: VQDNAConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vqdna = VQDNAModel(config)
        if config.classifier_pooling == "mean_wide":
            self.token_layer = nn.Sequential(
                nn.Linear(config.classifier_window * config.layers_size, config.classifier_width), nn.ReLU())
        self.pooler = nn.Sequential(nn.Linear(config.pooled_size, config.pooled_size), nn.Tanh())
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.pooled_size, config.num_labels)
        self.post_init()

    def pool(self, input_ids, attention_mask=None, output_hidden_states=False, rc_input_ids=None,
             rc_attention_mask=None):
        """Runs the encoder; returns (the head's input [B, config.pooled_size], the encoder's output). The
        head's input is the last layer's CLS token, its mean over real (unpadded) tokens, ("mean_layers")
        those means of the embeddings' output and of every layer, concatenated, or ("mean_wide") the mean of
        token_layer over those concatenated states (of each config.classifier_window consecutive real
        tokens, concatenated in order). The output carries hidden_states when
        output_hidden_states (always computed for "mean_layers" and "mean_wide").
        With config.classifier_strands "both", rc_input_ids [B, L, n_levels] (and rc_attention_mask [B, L])
        are the codes of the reverse complements, padded to the same L (`ClassificationCollator` does): the
        head's input is the mean of the two strands' features, the encoder runs once on the 2B rows
        (forward strands first) and its output is that batch's."""
        both = self.config.classifier_strands == "both"
        if both != (rc_input_ids is not None):
            raise ValueError("classifier_strands 'both' needs rc_input_ids, the reverse complements' codes" if both
                             else "rc_input_ids given but classifier_strands is 'forward': set it to 'both' to use them")
        if not both:
            return self._pool_strand(input_ids, attention_mask, output_hidden_states)
        if rc_input_ids.shape != input_ids.shape:
            raise ValueError(f"rc_input_ids shape {tuple(rc_input_ids.shape)} != input_ids shape {tuple(input_ids.shape)}: "
                             "pad both strands to one length")
        masks = [m if m is not None else default_attention_mask(x, self.config.codebook_sizes)
                 for x, m in ((input_ids, attention_mask), (rc_input_ids, rc_attention_mask))]
        pooled, out = self._pool_strand(torch.cat([input_ids, rc_input_ids]), torch.cat([m.long() for m in masks]),
                                        output_hidden_states)
        return pooled.view(2, input_ids.shape[0], -1).mean(0), out

    @staticmethod
    def _head_precision(device):
        """A context in which the head (pooling means, token layer, pooler, classifier) computes in its own
        parameters' dtype whatever autocast is active. The pooler standardises features whose spread between
        sequences is a small fraction of their size (token means; the probe head's pooler divides by that
        spread), so bf16 rounding of the means, of the token layer's output or of the pooler's input moves them
        by much of a standard deviation: under CPU bf16 autocast, GUE mouse 0's probe head went from dev MCC
        0.6511 / test 0.5583 to 0.6449 / 0.5490 with the encoder's states kept in float32, while rounding only
        those states to bf16 gave 0.6508 / 0.5583 (examples/RESULTS.md). So the encoder may run in bf16 (the
        Trainer's bf16 on a GPU), the head does not."""
        return torch.autocast(device_type=device.type, enabled=False)

    def _pool_strand(self, input_ids, attention_mask, output_hidden_states):
        pooling = self.config.classifier_pooling
        layers = pooling in ("mean_layers", "mean_wide")
        out = self.vqdna(input_ids, attention_mask, output_hidden_states=output_hidden_states or layers, return_dict=True)
        with self._head_precision(input_ids.device):
            return self._pool_states(out, input_ids, attention_mask), out

    def _pool_states(self, out, input_ids, attention_mask):
        """The head's input [B, config.pooled_size] (in the head's dtype) from the encoder's output."""
        pooling, dtype = self.config.classifier_pooling, self.classifier.weight.dtype
        if pooling == "cls":
            return out.last_hidden_state[:, 0].to(dtype)
        if attention_mask is None:
            attention_mask = default_attention_mask(input_ids, self.config.codebook_sizes)
        w = attention_mask.to(dtype)[..., None]
        if pooling == "mean_wide":
            states, window = torch.cat([h.to(dtype) for h in out.hidden_states], dim=-1), self.config.classifier_window
            if window > 1:  # [B, L, S] -> [B, L - W + 1, W * S]: token t's states, then t + 1's, ...; windows
                # that reach a padded position do not count (right padding: every window of real tokens is kept)
                short = max(window - states.shape[1], 0)  # fewer positions than one window: none counts
                states, w = F.pad(states, (0, 0, 0, short)), F.pad(w, (0, 0, 0, short))
                states = states.unfold(1, window, 1).transpose(2, 3).flatten(2)
                w = w.unfold(1, window, 1).amin(-1)
            chosen = (self.token_layer(states),)
        else:
            chosen = out.hidden_states if pooling == "mean_layers" else (out.last_hidden_state,)
        count = w.sum(1).clamp(min=1)
        return torch.cat([(h.to(dtype) * w).sum(1) / count for h in chosen], dim=-1)

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None,
                rc_input_ids=None, rc_attention_mask=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        pooled, out = self.pool(input_ids, attention_mask, output_hidden_states=bool(output_hidden_states),
                                rc_input_ids=rc_input_ids, rc_attention_mask=rc_attention_mask)
        with self._head_precision(pooled.device):
            logits = self.classifier(self.dropout(self.pooler(pooled)))
        # only when asked for: Trainer's evaluation would otherwise gather every layer of every sequence
        states = out.hidden_states if output_hidden_states else None
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1)) if self.num_labels == 1 \
                    else F.mse_loss(logits.float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1).long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if not return_dict:
            return tuple(x for x in (loss, logits, states) if x is not None)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states)


def load_classifier(model_dir, **overrides) -> VQDNAForSequenceClassification:
    """VQDNAForSequenceClassification from a VQDNA checkpoint folder (a masked LM's or a classifier's);
    overrides are config fields (num_labels, classifier_pooling, dropouts...). The expected head swap is
    silent; any other tensor missing from the checkpoint or left unused raises ValueError naming the
    tensors and the folder (a silently random encoder weight would only show as a poor result)."""
    model, info = VQDNAForSequenceClassification.from_pretrained(model_dir, output_loading_info=True, **overrides)
    bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise ValueError(f"{model_dir}: the checkpoint does not match VQDNAForSequenceClassification: "
                         + "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v))}" for k, v in bad.items()))
    return model


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForMaskedLM / AutoModelForSequenceClassification know
    model_type "vqdna" (no trust_remote_code). Called at `import vqdna`."""
    AutoConfig.register("vqdna", VQDNAConfig, exist_ok=True)
    AutoModel.register(VQDNAConfig, VQDNAModel, exist_ok=True)
    AutoModelForMaskedLM.register(VQDNAConfig, VQDNAForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(VQDNAConfig, VQDNAForSequenceClassification, exist_ok=True)


register_auto_classes()
