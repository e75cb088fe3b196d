"""Timing, device limits measured at run time, and the ratio table of one run.

One implementation shared by `vqdna bench` and the pytest-benchmark suite in the repository's
bench/ folder. A result row is a dict:

    {op, backend, kind ("backend" | "peer"), device, dtype, shape, ms,
     gflops | gbps | bases_per_s, peak_gflops | peak_gbps, fraction_of_peak,
     speedup_vs_reference, speedup_vs_<peer>...}

Compute-bound ops give FLOPs (2 N K D for a lookup) and are measured against the matrix peak;
memory-bound ops give bytes moved (each input read once, each output written once) and are measured
against the copy bandwidth; end-to-end tokenization gives bases (bases_per_s, no limit).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from typing import Callable, Optional

import torch

_peaks: dict = {}


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous; the CPU is not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: str | torch.device) -> Callable[[], None]:
    """fn followed by a device synchronisation: what a host clock around it measures is the work."""

    def call():
        fn()
        synchronize(device)

    return call


# Short calls are repeated until about this much time is spent (at most _MAX_ROUNDS calls): on a
# shared machine a best-of-5 of a 1 ms call still catches preemptions.
_MIN_TOTAL_S = 0.25
_MAX_ROUNDS = 50


def choose_rounds(first_call_s: float, rounds: int) -> int:
    """Rounds to time a call that took `first_call_s` once: at least `rounds`, more for short
    calls (until ~0.25 s in all, at most 50)."""
    if first_call_s <= 0:
        return _MAX_ROUNDS
    return int(min(_MAX_ROUNDS, max(rounds, _MIN_TOTAL_S / first_call_s)))


def time_fn(fn: Callable, device: str | torch.device, rounds: int = 5, warmup: int = 1) -> float:
    """Best wall time in seconds of fn over at least `rounds` calls (more for short calls, see
    choose_rounds) after `warmup` calls, synchronising the device around each."""
    return time_interleaved([fn], device, [rounds], warmup)[0]


def time_interleaved(fns: list[Callable], device: str | torch.device, rounds: list[int], warmup: int = 1) -> list[float]:
    """Best wall time in seconds of each of `fns`, their timed calls taken in turn (round robin) rather
    than one function after another, so drifting machine load (a shared VM's neighbours, clock
    changes) falls on every implementation alike and their ratios stay comparable. Function i gets at
    least rounds[i] timed calls (more when short, see choose_rounds) after `warmup` calls."""
    calls = [timed(fn, device) for fn in fns]
    todo = []
    for call, r in zip(calls, rounds):
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            call()
        todo.append(choose_rounds((time.perf_counter() - t0) / max(1, warmup), r))
    best = [float("inf")] * len(calls)
    for step in range(max(todo, default=0)):
        for i, call in enumerate(calls):
            if step < todo[i]:
                t0 = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def limit_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype whose matrix peak bounds a kernel on `device`: on the CPU every backend computes
    half-precision inputs in float32 (and torch's CPU bf16 GEMM is far slower), so float32."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def matmul_peak_gflops(device: str | torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None) -> float:
    """The device's matrix limit measured now (GFLOP/s): best of 5 square n x n matmuls in `dtype`
    (TF32 off). n defaults to 8192 on CUDA, 4096 on the CPU; cached per (device, dtype, n)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 4096)
    key = ("matmul", str(device), dtype, n)
    if key not in _peaks:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device, dtype)  # random data: zeros run faster
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            seconds = time_fn(lambda: a @ b, device, rounds=5, warmup=1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        _peaks[key] = 2.0 * n**3 / seconds / 1e9
    return _peaks[key]


def copy_bandwidth_gbps(device: str | torch.device, dtype: torch.dtype = torch.float32, numel: Optional[int] = None) -> float:
    """The device's memory limit measured now (GB/s): best of 5 large device copies in `dtype`,
    counting bytes read plus bytes written. numel defaults to 2^28 on CUDA (1 GiB of float32),
    2^25 on the CPU; cached per (device, dtype, numel)."""
    device = torch.device(device)
    numel = numel or ((1 << 28) if device.type == "cuda" else (1 << 25))
    key = ("copy", str(device), dtype, numel)
    if key not in _peaks:
        src = torch.ones(numel, dtype=dtype, device=device)
        dst = torch.empty_like(src)
        seconds = time_fn(lambda: dst.copy_(src), device, rounds=5, warmup=1)
        _peaks[key] = 2.0 * src.element_size() * numel / seconds / 1e9
    return _peaks[key]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_row(
    op: str,
    impl: str,
    device: str,
    dtype,
    shape: dict,
    seconds: float,
    flops: Optional[float] = None,
    bytes_moved: Optional[float] = None,
    bases: Optional[int] = None,
    kind: str = "backend",
    peak_size: Optional[int] = None,
) -> dict:
    """One measured point. impl: a backend name or a peer ("torch", "faiss", ...). Give one of flops
    (fraction of the matrix peak), bytes_moved (fraction of the copy bandwidth) or bases (bases_per_s);
    bases may come with flops too (both rates). peak_size: the matmul side / copy length for the limit
    (None: the defaults)."""
    if sum(x is not None for x in (flops, bytes_moved, bases)) != 1 and not (flops is not None and bases is not None and bytes_moved is None):
        raise ValueError(f"make_row({op!r}, {impl!r}): give exactly one of flops, bytes_moved, bases (bases may come with flops)")
    if not seconds > 0:
        raise ValueError(f"make_row({op!r}, {impl!r}): time must be positive, got {seconds}")
    torch_dtype = getattr(torch, dtype_name(dtype)) if not isinstance(dtype, torch.dtype) else dtype
    row = {
        "op": op,
        "backend": impl,
        "kind": kind,
        "device": torch.device(device).type,
        "dtype": dtype_name(dtype),
        "shape": dict(shape),
        "ms": seconds * 1e3,
    }
    if flops is not None:
        ldt = limit_dtype(device, torch_dtype)
        peak = matmul_peak_gflops(device, ldt, peak_size)
        row.update(gflops=flops / seconds / 1e9, peak_gflops=peak, peak_dtype=dtype_name(ldt))
        row["fraction_of_peak"] = row["gflops"] / peak
    elif bytes_moved is not None:
        peak = copy_bandwidth_gbps(device, torch_dtype, None if peak_size is None else peak_size * peak_size)
        row.update(gbps=bytes_moved / seconds / 1e9, peak_gbps=peak)
        row["fraction_of_peak"] = row["gbps"] / peak
    else:
        row.update(fraction_of_peak=None)
    if bases is not None:
        row["bases_per_s"] = bases / seconds
    return row


def case_key(row: dict) -> tuple:
    return (row["op"], row["device"], row["dtype"], json.dumps(row["shape"], sort_keys=True))


def add_ratios(rows: list[dict]) -> dict:
    """Fill speedup_vs_reference and speedup_vs_<peer> in place, within each case (same op, device,
    dtype and shape, so within one run). Returns {case_key: rows}."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(case_key(r), []).append(r)
    for case_rows in by_case.values():
        ref = next((r for r in case_rows if r["backend"] == "reference"), None)
        peers = {r["backend"]: r for r in case_rows if r["kind"] == "peer"}
        for r in case_rows:
            r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref else None
            for name, p in peers.items():
                r[f"speedup_vs_{name}"] = p["ms"] / r["ms"]
    return by_case


def format_table(rows: list[dict]) -> list[str]:
    """The ratio table as text lines, one block per case, fastest first."""
    lines: list[str] = []
    for (op, device, dtype, shape), case_rows in add_ratios(rows).items():
        first = case_rows[0]
        if "gflops" in first:
            unit, rate_key = "GFLOP/s", "gflops"
            limit = f"measured matrix peak {first['peak_gflops']:.3g} GFLOP/s ({first['peak_dtype']})"
        elif "gbps" in first:
            unit, rate_key, limit = "GB/s", "gbps", f"measured copy bandwidth {first['peak_gbps']:.3g} GB/s"
        else:
            unit, rate_key, limit = "Mbase/s", "bases_per_s", "no device limit"
        lines.append(f"{op} {device} {dtype} {shape}  ({limit})")
        peers = [r["backend"] for r in case_rows if r["kind"] == "peer"]
        lines.append(
            f"  {'impl':<26} {'ms':>10} {unit:>9} {'of peak':>8} {'vs ref':>8}" + "".join(f" {'vs ' + p:>12}" for p in peers)
        )
        for r in sorted(case_rows, key=lambda r: r["ms"]):
            rate = r[rate_key] / (1e6 if rate_key == "bases_per_s" else 1)
            of_peak = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}%"
            vs_ref = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
            rate_text = f"{rate:9.1f}" if rate >= 10 else f"{rate:9.3g}"
            line = f"  {r['backend']:<26} {r['ms']:10.3f} {rate_text} {of_peak:>8} {vs_ref:>8}"
            line += "".join(f" {r['speedup_vs_' + p]:11.2f}x" for p in peers)
            if rate_key != "bases_per_s" and r.get("bases_per_s"):
                line += f"  {r['bases_per_s'] / 1e6:.3f} Mbase/s"
            lines.append(line)
    return lines


def device_description(device: str | torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU model with its core and thread counts."""
    from vqdna.kernels.dispatch import device_name

    device = torch.device(device)
    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def provenance(device: str | torch.device, command: str) -> dict:
    """Where a result came from: device, torch, triton, commit (when run inside a git checkout),
    command and UTC date."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_description(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str, rows: list[dict], prov: dict, note: Optional[str] = None) -> tuple[str, str]:
    """Write {provenance..., results: rows} as JSON to `path` and the text table as Markdown beside
    it (same name, .md). Returns both paths."""
    lines = format_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**prov, "note": note, "results": rows}, f, indent=1)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write("# vqdna benchmark results\n\n")
        if note:
            f.write(note.strip() + "\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in prov.items()))
        f.write("\n```\n" + "\n".join(lines) + "\n```\n")
    return path, md
