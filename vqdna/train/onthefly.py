"""On-the-fly tokenization for masked-LM pre-training (issue 20): code windows drawn from raw
sequences instead of token files.

`GenomeWindows` lays out the same windows as `CodeWindows` over token files (record i, starts 0,
window, 2 * window, ... of its length), so index j is the same window in both, and a sampler seeded
alike (the transformers Trainer's RandomSampler) draws the same windows from either. Item j is the
window's base ids read with a halo of the tokenizer's receptive radius R on each side, clipped at the
record ends (docs/design.md §2.5: a base's codes depend on bases t - R .. t + R only, and beyond a
record end on nothing, exactly as `vqdna tokenize` packs its windows). `OnTheFlyEncoder` encodes a
list of such items in one padded batch (PAD positions are masked, as between the packed segments of
`vqdna tokenize`) and crops the halo, giving the codes `vqdna tokenize` writes for the same bases.
`OnTheFlyMLMCollator` puts the encode in the data path ahead of the usual MLM masking; pretrain() runs
it ahead of the training step, overlapping it (vqdna.train.prefetch: a background thread, on a GPU on
a side stream; or DataLoader worker processes when num_workers > 0).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vqdna.data.alphabet import PAD
from vqdna.train.pretrain import MLMCollator, window_starts

__all__ = ["GenomeWindow", "GenomeWindows", "OnTheFlyEncoder", "OnTheFlyMLMCollator"]


class GenomeWindow(NamedTuple):
    """One window with its halo: ids uint8 [n + left + right] (bases [start - left, start + n + right)
    of the record), left/n: where the window's own bases are inside ids; number: its dataset index."""

    ids: np.ndarray
    left: int
    n: int
    number: int = -1


class GenomeWindows(Dataset):
    """Windows of at most `window` bases over the records of a vqdna.data.SequenceIndex, each read
    with `halo` bases of context on each side (clipped at the record ends); item j -> GenomeWindow.
    Same layout and order as CodeWindows over the token files of the same inputs. An index whose
    genome files changed since they were decoded is refused (vqdna.data.StaleIndexError)."""

    def __init__(self, index, window: int, halo: int, min_length: int = 1):
        if halo < 0:
            raise ValueError(f"halo must be >= 0, got {halo}")
        index.check_current()  # else the windows would be of a genome that no longer exists
        self.sequences, self.window, self.halo = index, window, halo
        self.lengths = np.asarray(index.lengths, dtype=np.int64)
        self.offsets = np.asarray(index.offsets, dtype=np.int64)
        self.index = window_starts(self.lengths, window, min_length)

    def __len__(self) -> int:
        return len(self.index)

    # Pickled (DataLoader workers under spawn/forkserver) as the index directory: the memory map is
    # reopened, not copied into every worker.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["sequences"] = self.sequences.directory
        return state

    def __setstate__(self, state: dict) -> None:
        from vqdna.data import SequenceIndex

        self.__dict__.update(state)
        self.sequences = SequenceIndex.open(state["sequences"])

    def __getitem__(self, j: int) -> GenomeWindow:
        i, start = (int(v) for v in self.index[j])
        n_rec = int(self.lengths[i])
        n = min(self.window, n_rec - start)
        lo, hi = max(0, start - self.halo), min(n_rec, start + n + self.halo)
        base = int(self.offsets[i])
        ids = np.asarray(self.sequences.data[base + lo : base + hi], dtype=np.uint8)
        return GenomeWindow(ids, start - lo, n, int(j))


class OnTheFlyEncoder:
    """Encodes GenomeWindow lists with a VQDNATokenizerModel: list -> list of int64 codes
    [n_i, n_levels] (halo cropped). One padded batch [len(items), longest] per call on `device`, in
    `dtype` "fp32" or "bf16" (None: `vqdna tokenize`'s default there, bf16 autocast on CUDA, fp32 on
    the CPU; the codes equal the token files' when both computed in the same dtype).
    `threads` counts the calls per thread name (which thread ran the encode: logs and tests)."""

    def __init__(self, model, device: str | torch.device = "cpu", dtype: str | None = None):
        self.model = model.eval()
        self.device = torch.device(device)
        self.dtype = dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.dtype not in ("fp32", "bf16") or (self.dtype == "bf16" and self.device.type != "cuda"):
            raise ValueError(f"on-the-fly encode dtype must be fp32, or bf16 on CUDA; got {self.dtype} on {self.device}")
        self.model.to(self.device)
        self.threads: Counter = Counter()

    def __call__(self, items: Sequence[GenomeWindow]) -> list[torch.Tensor]:
        self.threads[threading.current_thread().name] += 1
        if not items:
            return []
        width = max(len(it.ids) for it in items)
        ids = np.full((len(items), width), PAD, dtype=np.uint8)
        for r, it in enumerate(items):
            ids[r, : len(it.ids)] = it.ids
        # the autocast of vqdna.streaming's compute step, so bf16 codes equal `vqdna tokenize --dtype bf16`'s
        bf16 = self.dtype == "bf16"
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            codes = self.model.encode(torch.from_numpy(ids).to(self.device)).cpu()
        return [codes[r, it.left : it.left + it.n].long() for r, it in enumerate(items)]


class OnTheFlyMLMCollator:
    """list of GenomeWindow -> the MLMCollator batch of their codes (encoded here, so whatever runs the
    collator ahead of the step, the prefetch thread or a DataLoader worker, also runs the encode)."""

    def __init__(self, model, codebook_sizes, mlm_probability: float = 0.25, pad_to_multiple_of: int = 8,
                 seed: int | None = None, device: str | torch.device = "cpu", dtype: str | None = None):
        self.encoder = OnTheFlyEncoder(model, device, dtype)
        self.mlm = MLMCollator(codebook_sizes, mlm_probability, pad_to_multiple_of, seed=seed)

    def __call__(self, features):
        return self.mlm(self.encoder(features))
