"""vqdna.kernels.sample_codes: validation and one dispatch per call."""

from __future__ import annotations

import os

import torch

from vqdna.kernels import reference
from vqdna.kernels.dispatch import select_backend
from vqdna.kernels.ops.registry import backend_op, declaration
from vqdna.kernels.ops.sample_codes.declaration import PHILOX_BACKENDS

__all__ = ["sample_codes", "philox_seed"]


def sample_codes(
    z: torch.Tensor, codebook: torch.Tensor, temp: float, *, cosine: bool = False, block_rows: int = 4096,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-max code of every row of z [N, D] over codebook [K, D] (float32; the same device):
    codes int64 [N] (-distance / temp, or with cosine z.e / temp, plus Gumbel noise), quantized [N, D]
    float32 = codebook[codes] and dist [N] float32 = ||z - quantized||^2. temp > 0. Not
    differentiable (inputs detached). The noise comes from the default torch generator of z's device:
    `torch.manual_seed` makes calls reproducible, and successive calls draw different noise.
    backend: "auto" (CPU: native; CUDA: triton) |
      "native" (CPU) and "reference" (any device; the one traced under torch.compile): the peer's
        exact draws, reference.sample_codes: N K uniforms from the generator as vector-quantize-pytorch
        draws them (row-major uniform_), so the same seed gives the peer's codes. The native kernel
        draws from the generator's engine and fuses the noise, the distances' epilogue and the argmin;
      "triton" (CUDA; CPU under TRITON_INTERPRET=1): one fused kernel, reference.sample_codes_philox.
        A difference on purpose: its noise is Triton's counter-based Philox (tl.rand) keyed by a seed
        drawn on the device from the generator (one int64, no host sync), not the peer's uniform_
        stream: the same distribution, other numbers, so the same seed does not give the peer's codes
        (backend="reference" does, on CUDA too).
    block_rows: rows per distance block of the torch-stream backends (the draws do not depend on it).
    Per-head codebooks: codebook [C, K, D] with z [N, C, D] (head c of every row sampled from codebook
    c; rows read in place by the native backend) -> codes [N, C], quantized [N, C, D], dist [N, C], all
    heads in one kernel call. The draws are those of C single-codebook calls on z[:, c] in order of c
    (codebook 0's N K uniforms first: [C, N, K] row-major, the peer's order; Philox: the counters
    (c N + i) K + k), so the codes equal those calls' codes under the same seed."""
    heads = codebook.dim() == 3
    if heads and (z.dim() != 3 or z.shape[1] != codebook.shape[0] or z.shape[2] != codebook.shape[2]):
        raise ValueError(f"sample_codes: need z [N, C, D] with codebook [C, K, D], got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if not heads and (z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]):
        raise ValueError(f"sample_codes: need z [N, D] and codebook [K, D] (or z [N, C, D] and codebook [C, K, D]), "
                         f"got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if heads and codebook.shape[0] == 0:
        raise ValueError(f"sample_codes: codebook has shape {tuple(codebook.shape)}: no codebooks (C = 0)")
    if codebook.shape[-2] == 0:
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
    rows = z.shape[0] * (codebook.shape[0] if heads else 1)
    name = select_backend("sample_codes", backend, z.device, z.dtype, size=(rows, codebook.shape[-2]))
    seed = philox_seed(z.device) if name in PHILOX_BACKENDS else None
    return backend_op("sample_codes", name)(z, codebook, float(temp), bool(cosine), int(block_rows), seed)


def philox_seed(device: torch.device) -> torch.Tensor:
    """The Philox key of one call of a PHILOX_BACKENDS backend: int64 [1] drawn on `device` from its
    default generator (reproducible under torch.manual_seed; no host sync)."""
    return torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)
