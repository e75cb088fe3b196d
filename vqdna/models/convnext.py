"""1D ConvNeXt encoder and decoder of the tokenizer (docs/design.md §1), channels-last [B, L, D] throughout.

Features at masked-out positions (padding, base id 5) are zeroed after the stem and after every
block, so a record padded inside a batch encodes exactly as the record alone would (the depthwise
convolutions then see zeros there, the same as their own zero padding at the record's ends).

Inference (no autograd) runs each block as the op `vqdna.kernels.convnext_block`, whose dispatch takes
the fused native CPU kernel (csrc/ops/convnext_block/cpu.cpp: one pass per tile of positions around two
plain GEMMs, instead of the module's transposes and [B, L, 4D] temporaries) for float32 CPU tensors and
the spec `vqdna.kernels.reference.convnext_block` (the module's own ops) otherwise, or when
VQDNA_BACKEND=reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vqdna.kernels import convnext_block as fused_block
from vqdna.kernels import reference
from vqdna.kernels import stem as fused_stem
from vqdna.kernels.reference import BASE_PAD_ID, NUM_BASES

__all__ = [
    "ConvNeXtBlock1d", "ConvNeXt1dStem", "ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "base_mask",
]

LN_EPS = 1e-6


def base_mask(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The bool mask [B, L] of real bases: `mask` if given (and-ed with ids < 5), else ids < 5."""
    real = ids < BASE_PAD_ID
    if mask is None:
        return real
    if mask.shape != ids.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, ids {tuple(ids.shape)}")
    return mask.bool() & real


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor [B, L], got {ids.dtype} {tuple(ids.shape)}")
    if torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids > BASE_PAD_ID)
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"ids[{b}, {t}] = {int(ids[b, t])} is not a base id (0..4 = A C G T N) or the pad id 5")


class ConvNeXt1dStem(nn.Module):
    """ids [B, L] (0..4 bases, 5 pad) -> GELU(LayerNorm(Conv1d(one_hot(ids)))) [B, L, D] (weights' dtype),
    exactly `vqdna.kernels.reference.stem(ids, conv.weight, conv.bias, norm.weight, norm.bias, 1e-6)`
    (the pad id's one-hot row is all zeros). Masked positions are NOT zeroed here (the encoder does)."""

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"stem kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv1d(NUM_BASES, dim, kernel_size, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The fused op (docs/design.md §2.5: gather-sum over the ids, LayerNorm, GELU; no one-hot tensor) on the
        # fastest backend, differentiable w.r.t. the conv and norm parameters; output in their dtype.
        w = self.conv.weight
        return fused_stem(ids, w, self.conv.bias, self.norm.weight, self.norm.bias, ln_eps=self.norm.eps, out_dtype=w.dtype)


class ConvNeXtBlock1d(nn.Module):
    """x [B, L, D] -> x + gamma * Linear(GELU(Linear(LayerNorm(DWConv1d(x))))) [B, L, D]."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: int = 4, layer_scale_init: float = 1e-6):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        # Layer scale (ConvNeXt): every block starts near the identity.
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def _params(self) -> tuple:
        """The block's parameters in the order of vqdna.kernels.reference.convnext_block."""
        return (self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias,
                self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.convnext_block(x, None, *self._params(), ln_eps=self.norm.eps)

    def forward_masked(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """keep * block(x) [B, L, D] (keep [B, L] bool or None = all): the op vqdna.kernels.convnext_block
        where it applies (`_fused_applies`; its dispatch picks the backend), else the module's ops."""
        if _fused_applies(x):
            return fused_block(x, keep, *self._params(), ln_eps=self.norm.eps)
        return reference.convnext_block(x, keep, *self._params(), ln_eps=self.norm.eps)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x * keep[..., None].to(x.dtype)


def _fused_applies(x: torch.Tensor) -> bool:
    """The op vqdna.kernels.convnext_block has no autograd: it runs when no gradient is recorded and
    torch.compile is not tracing (which then compiles the module's ops). Which backend runs (the
    native kernel for float32 CPU tensors, else the reference) is its dispatch's choice."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class ConvNeXt1dEncoder(nn.Module):
    """Stem + `depth` ConvNeXt blocks.

    forward(ids [B, L] int (0..4 = A C G T N, 5 = pad), mask [B, L] bool = None (default ids < 5))
    -> list of len(taps) tensors [B, L, dim]: the outputs after the tapped blocks (1-based; the last
    tap is `depth`), zero at masked-out positions. `receptive_radius` = stem_kernel // 2 +
    (kernel_size // 2) * taps[-1]: tap outputs at position t depend on bases t - R .. t + R only.
    `isolation_gap` = max(stem_kernel, kernel_size) // 2: two runs of bases that many masked
    positions apart in one row encode as each would alone (see the property).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        stem_kernel: int = 5,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        taps: Sequence[int] = (3, 6),
        layer_scale_init: float = 1e-6,
    ):
        super().__init__()
        taps = tuple(int(t) for t in taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 1 or taps[-1] != depth:
            raise ValueError(f"taps must be increasing block numbers in 1..depth ending at depth={depth}, got {taps}")
        self.dim, self.depth, self.taps = dim, depth, taps
        self.stem_kernel, self.kernel_size = stem_kernel, kernel_size
        self.stem = ConvNeXt1dStem(dim, stem_kernel)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock1d(dim, kernel_size, mlp_ratio, layer_scale_init) for _ in range(depth)
        )

    @property
    def receptive_radius(self) -> int:
        return self.stem_kernel // 2 + (self.kernel_size // 2) * self.taps[-1]

    @property
    def isolation_gap(self) -> int:
        """Masked positions needed between two runs of bases in a row so that neither's outputs change:
        the largest single convolution's radius, not R. Every layer's input is zero at masked positions
        (pad ids add nothing to the stem; features are zeroed after the stem and after every block), so
        a convolution at a base sees, across a gap at least its radius wide, only those zeros, exactly
        what it sees past a record's end; and the zeros are restored before the next layer."""
        return max(self.stem_kernel, self.kernel_size) // 2

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        _check_ids(ids)
        keep = base_mask(ids, mask)
        # Masked ids become pad so they contribute nothing to their neighbours through the stem.
        x = _masked(self.stem(torch.where(keep, ids, BASE_PAD_ID)), keep)
        outs = []
        for number, block in enumerate(self.blocks, start=1):
            x = block.forward_masked(x, keep)
            if number in self.taps:
                outs.append(x)
        return outs


class ConvNeXt1dDecoder(nn.Module):
    """The encoder's mirror: `depth` ConvNeXt blocks, LayerNorm, Linear(dim, 5).

    forward(z [B, L, dim], mask [B, L] bool = None) -> logits [B, L, 5] over A C G T N (float32 or
    the autocast dtype). Masked-out positions are zeroed after every block.
    """

    def __init__(self, dim: int, depth: int, kernel_size: int = 7, mlp_ratio: int = 4, layer_scale_init: float = 1e-6):
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvNeXtBlock1d(dim, kernel_size, mlp_ratio, layer_scale_init) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, NUM_BASES)

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = z if mask is None else _masked(z, mask)
        for block in self.blocks:
            x = block(x)
            if mask is not None:
                x = _masked(x, mask)
        return self.head(self.norm(x))
