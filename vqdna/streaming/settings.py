"""The settings of a tokenization run: one frozen, typed record, validated once (`Settings.__post_init__`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

DEFAULT_WINDOW = 8192  # output bases per window
DEFAULT_SHARD_BASES = 1 << 26  # bases per work unit (= shard)
DEFAULT_SHARD_RECORDS = 1 << 19  # pieces per work unit (= shard); 2^19 keeps 20 M short records under 1 GB peak RSS (2^20: 1.01 GB)
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 64}  # rows per batch


class TokenizeError(RuntimeError):
    """The run cannot start or continue (settings, inputs or tokenizer differ from the manifest...)."""


@dataclass(frozen=True)
class Settings:
    """What a run is asked to do, resolved and checked on construction (TokenizeError otherwise).

    window: output bases per window (inputs add the halo); batch_size: rows per batch (None: 8 on CPU,
    64 on CUDA); device: "cpu", "cuda" or "cuda:N" (None: cuda when available; under torchrun a bare
    "cuda" is cuda:LOCAL_RANK); dtype: "fp32" or "bf16" (None: bf16 on CUDA, fp32 on CPU, where only
    fp32 runs); shard_bases / shard_records: the work-unit sizes (bases and pieces per shard; a plain
    FASTA file is cut into byte ranges of about that many bytes and records: docs/token-files.md).
    After construction every field is concrete (no None) and `device` is a full device string.
    """

    window: int = DEFAULT_WINDOW
    batch_size: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    shard_bases: int = DEFAULT_SHARD_BASES
    shard_records: int = DEFAULT_SHARD_RECORDS

    def __post_init__(self) -> None:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise TokenizeError(f"device must be cpu or cuda, got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise TokenizeError(f"device {device!r}: {why}; use --device cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise TokenizeError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        dtype = self.dtype or ("bf16" if dev.type == "cuda" else "fp32")
        if dtype not in ("fp32", "bf16"):
            raise TokenizeError(f"dtype must be fp32 or bf16, got {dtype!r}")
        if dtype == "bf16" and dev.type != "cuda":
            raise TokenizeError("bf16 inference runs on CUDA devices; use --dtype fp32 on the CPU")
        batch_size = DEFAULT_BATCH_SIZE[dev.type] if self.batch_size is None else self.batch_size
        counts = {"window": self.window, "batch size": batch_size, "shard bases": self.shard_bases, "shard records": self.shard_records}
        for label, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TokenizeError(f"{label} must be an integer >= 1, got {value!r}")
        resolved = dict(zip(("window", "batch_size", "shard_bases", "shard_records"), (int(v) for v in counts.values())))
        for name, value in {**resolved, "device": str(dev), "dtype": dtype}.items():
            object.__setattr__(self, name, value)  # frozen: resolved once, here

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def manifest_fields(self) -> dict:
        """The settings a manifest records (each changes the output bytes, so a resume must match them).
        fp32 on a GPU and on a CPU may break near-ties differently: resuming must not mix them."""
        return {
            "window": self.window,
            "batch_size": self.batch_size,
            "shard_bases": self.shard_bases,
            "shard_records": self.shard_records,
            "compute": {"device": self.torch_device.type, "dtype": self.dtype},
        }
