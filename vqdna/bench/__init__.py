"""Benchmarks as library code (used by `vqdna bench` and by the pytest suite in bench/): cases
(op x backend x dtype x size, with peers), timing and device limits measured at run time, the ratio
table, plots, and the measured backend table that backend="auto" follows."""

from vqdna.bench.cases import SIZES, Case, Impl
from vqdna.bench.measure import (
    add_ratios,
    copy_bandwidth_gbps,
    format_table,
    make_row,
    matmul_peak_gflops,
    provenance,
    time_fn,
    time_interleaved,
    write_results,
)
from vqdna.bench.runner import run_case, run_cases


def __getattr__(name: str):
    if name == "OPS":  # derived from the op declarations on first use (vqdna.bench.cases)
        from vqdna.bench import cases

        return cases.OPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OPS", "SIZES", "Case", "Impl", "add_ratios", "copy_bandwidth_gbps", "format_table", "make_row",
    "matmul_peak_gflops", "provenance", "run_case", "run_cases", "time_fn", "time_interleaved", "write_results",
]
