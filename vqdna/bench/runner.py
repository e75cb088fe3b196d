"""Run benchmark cases: time every implementation of a case in one pass, their calls interleaved, so
the ratios compare implementations under the same machine load."""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Optional

import torch

from vqdna.bench.cases import Case
from vqdna.bench.measure import make_row, time_interleaved


def run_case(case: Case, rounds: int = 5, peak_size: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Time each implementation of `case` (best of `rounds` after a warm-up, the implementations'
    calls interleaved); one result row each."""
    rows = []
    impls = case.setup()
    if [i.name for i in impls] != list(case.impl_names):
        raise AssertionError(f"{case.id}: setup() built {[i.name for i in impls]}, the case declares {case.impl_names}")
    try:
        best = time_interleaved([i.fn for i in impls], case.device, [i.rounds or rounds for i in impls])
        for impl, seconds in zip(impls, best):
            row = make_row(
                case.op, impl.name, case.device, case.dtype, case.shape, seconds,
                flops=case.flops, bytes_moved=case.bytes_moved, bases=case.bases, kind=impl.kind, peak_size=peak_size,
            )
            if case.table is not None and impl.kind == "backend":
                row["table"] = dict(case.table)
            rows.append(row)
            if log:
                log(f"{case.id:<48} {impl.name:<28} {row['ms']:10.3f} ms")
    finally:
        del impls
        gc.collect()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_cases(cases: Iterable[Case], rounds: int = 5, peak_size: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> list[dict]:
    rows: list[dict] = []
    for case in cases:
        rows.extend(run_case(case, rounds=rounds, peak_size=peak_size, log=log))
        for why in case.skipped:
            if log:
                log(f"{case.id:<48} left out: {why}")
    return rows
