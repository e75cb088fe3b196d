"""1D ConvNeXt encoder and decoder of the tokenizer (DESIGN 1), channels-last [B, L, D] throughout.

Features at masked-out positions (padding, base id 5) are zeroed after the stem and after every
block, so a record padded inside a batch encodes exactly as the record alone would (the depthwise
convolutions then see zeros there, the same as their own zero padding at the record's ends).

Inference (no autograd, float32 on the CPU) runs each block as the fused native op
`vqdna::convnext_block_native` (csrc/ops/convnext_block/cpu.cpp) when vqdna._C has it: one pass per
tile of positions around two plain GEMMs, instead of the module's transposes and [B, L, 4D]
temporaries. Its spec is `convnext_block_reference` (the module's own ops); VQDNA_BACKEND=reference
forces the spec.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqdna.kernels import stem as fused_stem
from vqdna.kernels.reference import BASE_PAD_ID, NUM_BASES

__all__ = [
    "ConvNeXtBlock1d", "ConvNeXt1dStem", "ConvNeXt1dEncoder", "ConvNeXt1dDecoder", "base_mask",
    "convnext_block_reference", "native_block_available",
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
        # The fused op (DESIGN 2.5: gather-sum over the ids, LayerNorm, GELU; no one-hot tensor) on the
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + self.gamma * y

    def forward_masked(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """keep * block(x) [B, L, D] (keep [B, L] bool or None = all): the fused native op where it
        applies (see `_runs_native`), else the module's ops (`convnext_block_reference`)."""
        if _runs_native(self, x):
            return torch.ops.vqdna.convnext_block_native(
                x, keep, self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias, self.norm.eps,
                self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias, self.gamma,
            )
        return convnext_block_reference(self, x, keep)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x * keep[..., None].to(x.dtype)


def convnext_block_reference(block: ConvNeXtBlock1d, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """The spec of the fused op: keep * block(x) with the module's ops, x [B, L, D], keep [B, L] bool or None."""
    y = block(x)
    return y if keep is None else _masked(y, keep)


@functools.lru_cache(maxsize=None)
def native_block_available() -> bool:
    """True when vqdna._C registered the fused CPU block `vqdna::convnext_block_native`."""
    from vqdna import _ext

    if not _ext.extension_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("vqdna::convnext_block_native", "CPU")
    except RuntimeError:  # a vqdna._C built before the op existed
        return False


def _runs_native(block: ConvNeXtBlock1d, x: torch.Tensor) -> bool:
    """The fused op has no autograd and computes in float32 on the CPU: it runs when no gradient is
    recorded, x and the parameters are float32 CPU tensors, torch.compile is not tracing, and
    VQDNA_BACKEND does not ask for the reference."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and block.pwconv1.weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and os.environ.get("VQDNA_BACKEND", "auto").lower() != "reference"
        and native_block_available()
    )


class ConvNeXt1dEncoder(nn.Module):
    """Stem + `depth` ConvNeXt blocks.

    forward(ids [B, L] int (0..4 = A C G T N, 5 = pad), mask [B, L] bool = None (default ids < 5))
    -> list of len(taps) tensors [B, L, dim]: the outputs after the tapped blocks (1-based; the last
    tap is `depth`), zero at masked-out positions. `receptive_radius` = stem_kernel // 2 +
    (kernel_size // 2) * taps[-1]: tap outputs at position t depend on bases t - R .. t + R only.
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
