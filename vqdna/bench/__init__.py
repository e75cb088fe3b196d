"""Benchmarks as library code (used by `vqdna bench` and by the pytest suite in bench/): cases
(op x backend x dtype x size, with peers), timing and device limits measured at run time, the ratio
table, plots, and the measured backend table that backend="auto" follows."""

from vqdna.bench.cases import OPS, SIZES, Case, Impl
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

__all__ = [
    "OPS", "SIZES", "Case", "Impl", "add_ratios", "copy_bandwidth_gbps", "format_table", "make_row",
    "matmul_peak_gflops", "provenance", "run_case", "run_cases", "time_fn", "time_interleaved", "write_results",
]
