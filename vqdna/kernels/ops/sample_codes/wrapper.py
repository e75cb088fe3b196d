"""vqdna.kernels.sample_codes: validation and one dispatch per call."""

from __future__ import annotations

import os

import torch

from vqdna.kernels import reference
from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import backend_op, declaration

__all__ = ["sample_codes"]


def sample_codes(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, *, cosine: bool = False, block_rows: int = 4096,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-max code of every row of z [N, D] over codebook [K, D] (float32; the same device), drawn
    from the default torch generator of that device exactly as vector-quantize-pytorch draws it:
    codes int64 [N] (reference.sample_codes: -distance / temp, or with cosine z.e / temp, plus Gumbel
    noise; N K uniforms consumed in row-major order), quantized [N, D] float32 = codebook[codes] and
    dist [N] float32 = ||z - quantized||^2. temp > 0. Not differentiable (inputs detached).
    block_rows: rows per distance block (the draws do not depend on it).
    backend: "auto" | "native" (CPU: draws from the generator's engine and fuses the noise, the
    distances' epilogue and the argmin per block) | "reference" (torch ops; the only one on CUDA, and
    the one traced under torch.compile)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"sample_codes: need z [N, D] and codebook [K, D], got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("sample_codes: the codebook is empty (K = 0)")
    if z.dtype != torch.float32 or codebook.dtype != torch.float32:
        raise TypeError(f"sample_codes: z and codebook must be float32, got {z.dtype} and {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"sample_codes: device mismatch: z is on {z.device}, codebook on {codebook.device}")
    if not temp > 0:
        raise ValueError(f"sample_codes: temp must be > 0, got {temp}")
    if block_rows < 1:
        raise ValueError(f"sample_codes: block_rows must be >= 1, got {block_rows}")
    z, codebook = z.detach(), codebook.detach()
    if torch.compiler.is_compiling():  # the torch ops: their draws are traced like any other
        return reference.sample_codes(z, codebook, float(temp), bool(cosine), int(block_rows))
    if backend == "auto" and os.environ.get("VQDNA_BACKEND", "auto").lower() not in (*declaration("sample_codes").backends, "auto", ""):
        backend = "reference"  # a backend forced for the other ops that this one does not have
    name = select_backend("sample_codes", backend, z.device, z.dtype, size=(z.shape[0], codebook.shape[0]))
    return backend_op("sample_codes", name)(z, codebook, float(temp), bool(cosine), int(block_rows))
