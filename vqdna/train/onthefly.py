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
`OnTheFlyMLMCollator` puts the encode in the data path (in DataLoader workers when num_workers > 0,
so it overlaps the training step) ahead of the usual MLM masking.
"""

from __future__ import annotations

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
    Same layout and order as CodeWindows over the token files of the same inputs."""

    def __init__(self, index, window: int, halo: int, min_length: int = 1):
        if halo < 0:
            raise ValueError(f"halo must be >= 0, got {halo}")
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
    [n_i, n_levels] (halo cropped). One padded batch [len(items), longest] per call, fp32 on `device`."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        self.model.to(self.device)

    def __call__(self, items: Sequence[GenomeWindow]) -> list[torch.Tensor]:
        if not items:
            return []
        width = max(len(it.ids) for it in items)
        ids = np.full((len(items), width), PAD, dtype=np.uint8)
        for r, it in enumerate(items):
            ids[r, : len(it.ids)] = it.ids
        codes = self.model.encode(torch.from_numpy(ids).to(self.device)).cpu()
        return [codes[r, it.left : it.left + it.n].long() for r, it in enumerate(items)]


class OnTheFlyMLMCollator:
    """list of GenomeWindow -> the MLMCollator batch of their codes (encoded here, so a DataLoader
    worker that runs the collator also runs the encode, overlapping the training step)."""

    def __init__(self, model, codebook_sizes, mlm_probability: float = 0.25, pad_to_multiple_of: int = 8,
                 seed: int | None = None, device: str | torch.device = "cpu"):
        self.encoder = OnTheFlyEncoder(model, device)
        self.mlm = MLMCollator(codebook_sizes, mlm_probability, pad_to_multiple_of, seed=seed)

    def __call__(self, features):
        return self.mlm(self.encoder(features))
