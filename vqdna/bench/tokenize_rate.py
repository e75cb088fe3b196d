"""`vqdna bench --op tokenize-rate`: end-to-end `vqdna tokenize` (vqdna.streaming.tokenize_files: FASTA
reading, packing, encode, token files written) of many short records against the same bases as one
long record, timed interleaved in the same run, so `vs one-record` is the short records' bases/s as a
fraction of a genome's (the issue-18 target: >= 0.80). Short records are packed several to a window
with an isolation gap between them (docs/design.md §2.5): the gap positions are the price measured here.

The encoder is vqdna-small's architecture with random weights (speed does not depend on the weights), on
the CPU in float32 (the CPU's default precision), torch's thread count.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import torch

from vqdna.bench.cases import Case, Impl, left_out

# Per size: total bases of each case; the short-record lengths (inclusive range, uniform per record).
_BASES = {"tiny": 60_000, "small": 2_000_000, "full": 10_000_000}
_LENGTHS = ((100, 300), (30, 30))


def write_fasta(path: str, lengths: np.ndarray, seed: int) -> None:
    """Random ACGT records of the given lengths (names r0, r1, ...), 80 bases per line."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", np.uint8)
    with open(path, "wb") as f:
        for i, n in enumerate(lengths.tolist()):
            seq = letters[rng.integers(0, 4, n, dtype=np.uint8)].tobytes()
            f.write(b">r%d\n" % i + b"\n".join(seq[j : j + 80] for j in range(0, n, 80)) + b"\n")


def tokenize_rate_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    """One case per short-record length range: records of that length summing to _BASES[size] bases,
    beside one record of the same bases (the peer)."""
    if torch.device(device).type != "cpu" or torch.float32 not in dtypes:
        left_out.append(f"tokenize-rate: CPU float32 only (asked for {device}, {[str(d)[6:] for d in dtypes]})")
        return
    total = _BASES[size]
    for lo, hi in _LENGTHS:
        shape = {"records": f"{lo}-{hi}bp" if lo != hi else f"{lo}bp", "bases": total}
        case = Case("tokenize-rate", device, torch.float32, shape, None, bases=total)
        case.impl_names = ["vqdna", "one-record"]

        def setup(lo=lo, hi=hi):
            from vqdna.models.tokenizer_model import VQDNATokenizerConfig, VQDNATokenizerModel
            from vqdna.streaming import tokenize_files

            model = VQDNATokenizerModel(VQDNATokenizerConfig.named("vqdna-small")).eval()
            # record lengths uniform in [lo, hi], the last one cut so that they sum to `total`
            draws = np.random.default_rng(7).integers(lo, hi + 1, total // lo + 1)
            ends = np.cumsum(draws)
            last = int(np.searchsorted(ends, total))  # the first record reaching `total`
            lengths = draws[: last + 1].copy()
            lengths[-1] -= int(ends[last]) - total
            work = tempfile.TemporaryDirectory(prefix="vqdna-bench-tokenize-")
            short, long = os.path.join(work.name, "short.fa"), os.path.join(work.name, "long.fa")
            write_fasta(short, lengths, seed=1)
            write_fasta(long, np.array([total]), seed=1)

            def run(path, work=work):  # work: the inputs live as long as the implementations
                out = os.path.join(work.name, "tokens")
                shutil.rmtree(out, ignore_errors=True)
                stats = tokenize_files([path], out, model, device="cpu", dtype="fp32")
                if stats.bases != total:
                    raise RuntimeError(f"tokenize-rate: {path} gave {stats.bases} bases, expected {total}")

            return [Impl("vqdna", lambda: run(short), rounds=2), Impl("one-record", lambda: run(long), kind="peer", rounds=2)]

        case.setup = setup
        yield case
