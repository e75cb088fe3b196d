"""Benchmark plumbing for pytest-benchmark: the measurement code is vqdna.bench (shared with
`vqdna bench`); this file adds the options, markers and the end-of-session ratio table.

Each benchmark calls `record(...)`; at the end of the session the table (time, GFLOP/s or GB/s,
fraction of the device limit measured in this run, speed-up over the reference and the peers) is
printed and, with --vqdna-results FILE, written as JSON + Markdown with its provenance; with the
environment variable VQDNA_RESULTS_JSONL=FILE each row is also appended there as it is measured.
Options: --vqdna-size tiny|small|full (the case grid, vqdna.bench.cases; default small).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from vqdna.bench import measure
from vqdna.bench.measure import copy_bandwidth_gbps, matmul_peak_gflops  # noqa: F401  (re-exported for bench files)

_results: list[dict] = []
_peak_size = None


def pytest_addoption(parser):
    parser.addoption("--vqdna-results", default=None, help="write the ratio table as JSON (+ .md) to this file")
    parser.addoption("--vqdna-size", default="small", choices=["tiny", "small", "full"], help="benchmark case grid")


def pytest_configure(config):
    global _peak_size
    # Tiny runs measure the limits on smaller problems too (a 1024^2 matmul), as `vqdna bench` does.
    _peak_size = 1024 if config.getoption("--vqdna-size") == "tiny" else None
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "cpu: runs on the CPU")


def bench_size(config) -> str:
    return config.getoption("--vqdna-size")


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def time_call(benchmark, fn, device: str, rounds: int = 5) -> float:
    """Best wall time (s) of fn over at least `rounds` calls after one warm-up (the rounds rule of
    vqdna.bench.measure.time_fn: short calls repeat more), synchronising CUDA each call."""
    import time

    call = measure.timed(fn, device)
    t0 = time.perf_counter()
    call()  # the warm-up, timed to choose the rounds
    n = measure.choose_rounds(time.perf_counter() - t0, rounds)
    benchmark.pedantic(call, rounds=n, warmup_rounds=0, iterations=1)
    return benchmark.stats.stats.min


def record(op, impl, device, dtype, shape, seconds, flops=None, kind="backend", bytes_moved=None, bases=None, table=None):
    """One measured point (see vqdna.bench.measure.make_row): impl is a backend name or a peer
    ("torch", "faiss", ...); give flops (compute-bound), bytes_moved (memory-bound) or bases
    (end-to-end tokenization: bases_per_s)."""
    row = measure.make_row(op, impl, device, dtype, shape, seconds, flops=flops, bytes_moved=bytes_moved, bases=bases, kind=kind,
                           peak_size=_peak_size)
    if table is not None:
        row["table"] = dict(table)
    _results.append(row)
    jsonl = os.environ.get("VQDNA_RESULTS_JSONL")
    if jsonl:  # bench/gpu.sh: each point as it is measured, kept when the run is cut short
        with open(jsonl, "a") as f:
            f.write(json.dumps({"step": "suite", **row, "kind": "bench", "impl_kind": row["kind"]}) + "\n")
    return row


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    terminalreporter.section("vqdna: ratios measured in this run")
    for line in measure.format_table(_results):
        terminalreporter.write_line(line)
    out = config.getoption("--vqdna-results")
    if out:
        from vqdna.kernels.dispatch import device_name

        device = "cuda" if any(r["device"] == "cuda" for r in _results) else "cpu"
        prov = measure.provenance(device, " ".join(["pytest", *config.invocation_params.args]))
        prov["device_name"] = device_name(device)
        prov["size"] = bench_size(config)
        json_path, md_path = measure.write_results(out, _results, prov)
        terminalreporter.write_line(f"wrote {json_path} and {md_path}")
