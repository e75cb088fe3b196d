"""Benchmark plumbing: device limits measured at run time, and one table of ratios per run.

Each benchmark calls `record(...)`; at the end of the session the table (time, GFLOP/s, fraction of
the measured device limit, speed-up over the reference and over the peers, all from this one run) is
printed and, with --vqdna-results FILE, written as JSON with its provenance.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time

import pytest
import torch

_results: list[dict] = []
_peaks: dict = {}


def pytest_addoption(parser):
    parser.addoption("--vqdna-results", default=None, help="write the ratio table as JSON to this file")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "cpu: runs on the CPU")


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(benchmark, fn, device: str, rounds: int = 5) -> float:
    """Best wall time (s) of fn over `rounds` after one warm-up, synchronising CUDA each call."""

    def timed():
        fn()
        _sync(device)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    return benchmark.stats.stats.min


def matmul_peak_gflops(device: str, dtype: torch.dtype) -> float:
    """The device's matrix limit, measured now: best of a few large square matmuls (GFLOP/s)."""
    key = (device, dtype)
    if key not in _peaks:
        n = 8192 if torch.device(device).type == "cuda" else 4096
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        torch.backends.cuda.matmul.allow_tf32 = old
        _peaks[key] = 2.0 * n**3 / best / 1e9
    return _peaks[key]


def copy_bandwidth_gbps(device: str) -> float:
    """The device's memory limit, measured now: best large copy (read + write bytes, GB/s)."""
    key = (device, "copy")
    if key not in _peaks:
        n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 25)
        src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        _peaks[key] = 2 * 4 * n / best / 1e9
    return _peaks[key]


def record(op, impl, device, dtype, shape, seconds, flops=None, kind="backend", bytes_moved=None):
    """One measured point: impl is a backend name or a peer ("torch", "faiss", ...). Compute-bound
    ops give flops (fraction of the measured matrix peak), memory-bound ones bytes_moved (fraction
    of the measured copy bandwidth)."""
    row = {
        "op": op,
        "backend": impl,
        "kind": kind,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "ms": seconds * 1e3,
    }
    if flops is not None:
        # CPU kernels compute half-precision inputs in float32, so the float32 GEMM is their limit.
        cpu = torch.device(device).type == "cpu"
        peak = matmul_peak_gflops(device, torch.float32 if cpu or dtype == torch.float32 else dtype)
        row.update(gflops=flops / seconds / 1e9, peak_gflops=peak)
        row["fraction_of_peak"] = row["gflops"] / peak
    else:
        peak = copy_bandwidth_gbps(device)
        row.update(gbps=bytes_moved / seconds / 1e9, peak_gbps=peak)
        row["fraction_of_peak"] = row["gbps"] / peak
    _results.append(row)


def _ratios():
    by_case: dict = {}
    for r in _results:
        by_case.setdefault((r["op"], r["device"], r["dtype"], json.dumps(r["shape"])), []).append(r)
    for rows in by_case.values():
        ref = next((r for r in rows if r["backend"] == "reference"), None)
        peers = {r["backend"]: r for r in rows if r["kind"] == "peer"}
        for r in rows:
            r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref else None
            for name, p in peers.items():
                r[f"speedup_vs_{name}"] = p["ms"] / r["ms"]
    return by_case


def _provenance(config) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "command": " ".join(["pytest", *config.invocation_params.args]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    by_case = _ratios()
    lines: list[str] = []

    class _Tee:
        def write_line(self, line):
            lines.append(line)
            terminalreporter.write_line(line)

    tr = _Tee()
    terminalreporter.section("vqdna: ratios measured in this run")
    for (op, device, dtype, shape), rows in by_case.items():
        compute = "gflops" in rows[0]
        limit = f"matrix peak {rows[0]['peak_gflops']:.0f} GFLOP/s" if compute else f"copy bandwidth {rows[0]['peak_gbps']:.0f} GB/s"
        tr.write_line(f"{op} {device} {dtype} {shape}  (measured {limit})")
        peers = [r["backend"] for r in rows if r["kind"] == "peer"]
        unit = "GFLOP/s" if compute else "GB/s"
        head = f"  {'impl':<24} {'ms':>9} {unit:>9} {'of peak':>8} {'vs ref':>8}" + "".join(f" {'vs ' + p:>10}" for p in peers)
        tr.write_line(head)
        for r in sorted(rows, key=lambda r: r["ms"]):
            vs_ref = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
            rate = r["gflops"] if compute else r["gbps"]
            line = f"  {r['backend']:<24} {r['ms']:9.2f} {rate:9.1f} {100 * r['fraction_of_peak']:7.1f}% {vs_ref:>8}"
            line += "".join(f" {r['speedup_vs_' + p]:9.2f}x" for p in peers)
            tr.write_line(line)
    out = config.getoption("--vqdna-results")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        prov = _provenance(config)
        with open(out, "w") as f:
            json.dump({**prov, "results": _results}, f, indent=1)
        md = os.path.splitext(out)[0] + ".md"
        with open(md, "w") as f:
            f.write("# vqdna benchmark results\n\n")
            f.write("".join(f"- {k}: {v}\n" for k, v in prov.items()))
            f.write("\n```\n" + "\n".join(lines) + "\n```\n")
        terminalreporter.write_line(f"wrote {out} and {md}")
