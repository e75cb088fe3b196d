"""Ahead-of-time checks of the GPU code on a machine without a GPU (`vqdna gpu-check`).

Triton: every variant a launcher can run (`aot_variants()` of each kernel file: every autotune
config, dtype and constexpr variant) is compiled for `GPUTarget("cuda", arch, 32)` and ptxas's
report is read (registers, spill stores, shared memory). CUDA: every csrc/ops/<op>/*.cu is compiled
with nvcc `-Xptxas -v` with the build's flags for each arch and every kernel instantiation's report
is read. A record per (kernel, dtype, config, arch):

    {"op", "backend": "triton"|"cuda", "kernel", "dtype", "arch", "config", "ok", "error",
     "registers", "spill_bytes", "shared_bytes", "shared_limit", ...}

Failures (`problems()`): a compile error; shared memory over the arch's opt-in limit in a config the
launcher keeps for that arch (a config whose estimate is over the limit is pruned before the
autotuner sees it, and is reported as pruned, not compiled); a Triton config whose compiled shared
memory exceeds the estimate the pruner relies on; any spill in a CUDA kernel or a 16-bit Triton
kernel; a float32 Triton kernel spilling more than FP32_TRITON_SPILL_CAP_BYTES (docs/design.md says
why float32 may spill a little).

Compiles are cached (results only, keyed by the kernel source, signature, constants, options,
arch and compiler version) under $VQDNA_GPU_CHECK_CACHE or ~/.cache/vqdna/gpu-check.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from vqdna.kernels.triton.common import SHARED_LIMIT_BYTES



def triton_kernel_modules() -> list[str]:
    """The Triton kernel file of every op that declares one (vqdna/kernels/ops/<op>/triton_kernel.py),
    in registry order."""
    from vqdna.kernels.ops.registry import declarations

    return [d.triton for d in declarations().values() if d.triton]


# A float32 Triton kernel may spill this much per thread (docs/design.md: exact-fp32 tiles hold
# twice the operand registers of a 16-bit tile; the spilled values are loop-invariant row state
# that is re-read once per K tile, not per inner product).
FP32_TRITON_SPILL_CAP_BYTES = 64

REGISTER_LIMIT = 255
DEFAULT_ARCHS = (80, 90)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
# The build's nvcc flags (setup.py) that change code generation.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo"]

_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_arch(text: str) -> list[int]:
    """"sm_80,sm_90" / "80,90" / "8.0;9.0" -> [80, 90]."""
    archs = []
    for part in re.split(r"[,; ]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d)\.?(\d)a?", part)
        if not m:
            raise ValueError(f"gpu-check: cannot read the architecture {part!r} (expected e.g. sm_80,sm_90)")
        archs.append(int(m.group(1)) * 10 + int(m.group(2)))
    return archs


def _cache_dir() -> Path:
    d = os.environ.get("VQDNA_GPU_CHECK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vqdna", "gpu-check")
    return Path(d)


def _cache_get(key: str) -> Optional[object]:
    path = _cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(key: str, value) -> None:
    d = _cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass  # a cache that cannot be written only costs time


def _parse_ptxas(log: str) -> list[dict]:
    """ptxas -v output -> [{"function", "arch", "registers", "spill_bytes", "spill_loads", "stack_bytes", "static_shared"}]."""
    out = []
    cur = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = {"function": m.group(1), "arch": m.group(2), "registers": None, "spill_bytes": 0,
                   "spill_loads": 0, "stack_bytes": 0, "static_shared": 0}  # fmt: skip
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["stack_bytes"], cur["spill_bytes"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = _PTXAS_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["static_shared"] = int(m.group(2) or 0)
    return out


# ---------------------------------------------------------------------------------------------
# Triton


def triton_variants(full: bool = True) -> list:
    """Every AotVariant the launchers can run (each kernel file's `aot_variants()`); `full=False`:
    the representative subset, the first and the last declared variant of each (op, kernel, dtype)
    (the largest and the smallest tile, masked and unmasked, the fewest and the most levels)."""
    variants = [v for name in triton_kernel_modules() for v in importlib.import_module(name).aot_variants()]
    if full:
        return variants
    groups: dict = {}
    for v in variants:
        groups.setdefault((v.op, v.kernel, v.dtype), []).append(v)
    keep = {id(g[0]) for g in groups.values()} | {id(g[-1]) for g in groups.values()}
    return [v for v in variants if id(v) in keep]


def _triton_key(v, arch: int) -> str:
    import triton

    const = json.dumps({k: repr(x) for k, x in sorted(v.constexprs.items())})
    sig = json.dumps(sorted(v.signature.items()))
    text = "|".join([triton.__version__, str(arch), v.fn.cache_key, sig, const, str(v.num_warps), str(v.num_stages)])
    return "triton-" + hashlib.sha256(text.encode()).hexdigest()[:32]


_WORKER_VARIANTS: dict = {}


def _triton_task(full: bool, index: int, arch: int, use_cache: bool) -> dict:
    """compile_triton in a worker process: the variant by its index (JIT functions do not pickle)."""
    if full not in _WORKER_VARIANTS:
        _WORKER_VARIANTS[full] = triton_variants(full=full)
    return compile_triton(_WORKER_VARIANTS[full][index], arch, use_cache)


def compile_triton(v, arch: int, use_cache: bool = True) -> dict:
    """Compile one variant for `arch` without a GPU; the record of what ptxas reported."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqdna.kernels.triton.common import Tile, declared_for

    limit = SHARED_LIMIT_BYTES.get(arch)
    undeclared = v.archs is not None and not declared_for(Tile(0, 0, 0, 0, 0, archs=v.archs), arch)
    record = {
        "op": v.op, "backend": "triton", "kernel": v.kernel, "dtype": v.dtype, "arch": f"sm_{arch}",
        "config": v.config, "ok": False, "error": None, "registers": None, "spill_bytes": None,
        "shared_bytes": None, "shared_limit": limit, "shared_estimate": v.shared_estimate,
        "pruned": undeclared or (v.shared_estimate is not None and limit is not None and v.shared_estimate > limit),
        "cached": False,
    }  # fmt: skip
    if record["pruned"]:
        record["ok"] = True  # never compiled nor launched on this arch: the pruner drops it first
        return record
    key = _triton_key(v, arch)
    if use_cache:
        hit = _cache_get(key)
        if isinstance(hit, dict):
            record.update(hit, cached=True)
            return record
    t0 = time.perf_counter()
    log = io.StringIO()
    old_env = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR", "TRITON_INTERPRET")}
    with tempfile.TemporaryDirectory(prefix="vqdna-gpu-check-") as cache:
        # A private Triton cache: ptxas must run (its report is the point) and nothing is left behind.
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache, TRITON_INTERPRET="0")
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(
                    ASTSource(v.fn, v.signature, v.constexprs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": v.num_warps, "num_stages": v.num_stages},
                )
            metadata = kernel.metadata
            shared = metadata.shared if hasattr(metadata, "shared") else metadata["shared"]
            funcs = _parse_ptxas(log.getvalue())
            if not funcs:
                raise RuntimeError("no ptxas report captured (TRITON_DUMP_PTXAS_LOG not honoured by this Triton?)")
            f = funcs[-1]
            result = {"ok": True, "registers": f["registers"], "spill_bytes": f["spill_bytes"],
                      "shared_bytes": int(shared) + f["static_shared"]}  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failed compile is a result to report
            msg = f"{type(e).__name__}: {e}"
            result = {"ok": False, "error": msg[-2000:]}
        finally:
            for k, val in old_env.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    record.update(result)
    if use_cache and record["ok"]:
        _cache_put(key, result)
    return record


# ---------------------------------------------------------------------------------------------
# CUDA


def nvcc_path() -> Optional[str]:
    return shutil.which("nvcc")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "unknown"


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")  # binutils' c++filt reads nvcc's names too
    if not tool or not names:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if len(out) == len(names) else names


def _short_kernel(demangled: str) -> tuple[str, str, str]:
    """'void vqdna::cuda::(anonymous namespace)::hrq_kernel<__nv_bfloat16, true>(...)' ->
    ('hrq_kernel', 'bf16', '<__nv_bfloat16, true>')."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    head = re.sub(r"^void\s+", "", head)
    m = re.search(r"(\w+)(<.*>)?$", head)
    name = m.group(1) if m else head
    targs = (m.group(2) or "") if m else ""
    if "bfloat16" in targs:
        dtype = "bf16"
    elif "half" in targs:
        dtype = "fp16"
    elif re.search(r"\bfloat\b", targs):
        dtype = "fp32"
    else:
        dtype = "-"
    return name, dtype, targs


def cuda_sources() -> list[Path]:
    """Every CUDA source, csrc/ops/<op>/*.cu (the op is the folder's name)."""
    return sorted((CSRC / "ops").glob("*/*.cu"))


def _cuda_key(src: Path, arch: int, nvcc_version: str) -> str:
    h = hashlib.sha256()
    h.update(f"{nvcc_version}|{arch}|{' '.join(NVCC_FLAGS)}|{src.relative_to(CSRC)}".encode())
    # Every header of csrc may be included: hash them all with the source.
    for p in [src, *sorted(CSRC.rglob("*.h")), *sorted(CSRC.rglob("*.cuh"))]:
        h.update(str(p.relative_to(CSRC)).encode())
        h.update(p.read_bytes())
    return "cuda-" + h.hexdigest()[:32]


def compile_cuda(src: Path, arch: int, nvcc: str, nvcc_version: str, use_cache: bool = True) -> list[dict]:
    """Compile one .cu for `arch` with `-Xptxas -v`; one record per kernel instantiation."""
    op = src.parent.name
    key = _cuda_key(src, arch, nvcc_version)
    if use_cache:
        hit = _cache_get(key)
        if isinstance(hit, list):
            return [dict(r, cached=True) for r in hit]
    limit = SHARED_LIMIT_BYTES.get(arch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vqdna-gpu-check-") as tmp:
        cmd = [nvcc, "-c", *NVCC_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{CSRC}", str(src), "-o",
               os.path.join(tmp, "k.o")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = round(time.perf_counter() - t0, 2)
    base = {"op": op, "backend": "cuda", "arch": f"sm_{arch}", "shared_limit": limit, "compile_s": elapsed, "cached": False}
    if proc.returncode != 0:
        return [dict(base, kernel=str(src.relative_to(CSRC)), dtype="-", config="", ok=False, error=(proc.stderr or proc.stdout)[-2000:],
                     registers=None, spill_bytes=None, shared_bytes=None)]  # fmt: skip
    funcs = _parse_ptxas(proc.stdout + proc.stderr)
    names = _demangle([f["function"] for f in funcs])
    records = []
    for f, full in zip(funcs, names):
        kernel, dtype, targs = _short_kernel(full)
        records.append(dict(base, kernel=kernel, dtype=dtype, config=targs, ok=True, error=None,
                            registers=f["registers"], spill_bytes=f["spill_bytes"],
                            shared_bytes=f["static_shared"]))  # fmt: skip
    if use_cache:
        _cache_put(key, records)
    return records


# ---------------------------------------------------------------------------------------------
# The check


def problems(record: dict) -> list[str]:
    """Why a record fails the check (empty: it passes)."""
    out = []
    if not record["ok"]:
        return [f"compile error: {(record.get('error') or '').strip().splitlines()[-1:] or ['?']}"]
    if record.get("pruned"):
        return []
    limit = record.get("shared_limit")
    shared = record.get("shared_bytes")
    if limit is not None and shared is not None and shared > limit:
        out.append(f"shared memory {shared} B over the sm limit {limit} B")
    est = record.get("shared_estimate")
    if est is not None and shared is not None and shared > est:
        out.append(f"shared memory {shared} B over the pruning estimate {est} B")
    regs = record.get("registers")
    if regs is not None and regs > REGISTER_LIMIT:
        out.append(f"{regs} registers")
    spill = record.get("spill_bytes") or 0
    if spill:
        if record["backend"] == "cuda":
            out.append(f"spills {spill} B (no CUDA kernel may spill)")
        elif record["dtype"] in ("bf16", "fp16"):
            out.append(f"spills {spill} B (no 16-bit Triton kernel may spill)")
        elif spill > FP32_TRITON_SPILL_CAP_BYTES:
            out.append(f"spills {spill} B (float32 cap {FP32_TRITON_SPILL_CAP_BYTES} B)")
    return out


def run_check(
    archs: Iterable[int] = DEFAULT_ARCHS,
    full: bool = True,
    backends: Iterable[str] = ("triton", "cuda"),
    jobs: int = 1,
    use_cache: bool = True,
    ops: Optional[Iterable[str]] = None,
    progress=None,
) -> dict:
    """Compile everything for every arch; the report {"triton", "nvcc", "archs", "kernels": [...]}."""
    archs = list(archs)
    backends = set(backends)
    ops = set(ops) if ops else None
    report = {"triton": None, "nvcc": None, "archs": [f"sm_{a}" for a in archs], "full": full, "kernels": []}
    triton_tasks, cuda_tasks = [], []
    if "triton" in backends:
        import triton

        from vqdna.kernels.dispatch import triton_interpreter

        if triton_interpreter():
            raise RuntimeError("gpu-check compiles real GPU code: unset TRITON_INTERPRET (the CLI does it for you)")
        report["triton"] = triton.__version__
        variants = triton_variants(full=full)
        triton_tasks = [(i, a) for a in archs for i, v in enumerate(variants) if ops is None or v.op in ops]
    if "cuda" in backends:
        nvcc = nvcc_path()
        if nvcc is None:
            report["kernels"].append({"op": "*", "backend": "cuda", "kernel": "*", "dtype": "-", "arch": "-",
                                      "config": "", "ok": False, "error": "nvcc not found on PATH",
                                      "registers": None, "spill_bytes": None, "shared_bytes": None,
                                      "shared_limit": None})  # fmt: skip
        else:
            report["nvcc"] = _nvcc_version(nvcc)
            srcs = [s for s in cuda_sources() if ops is None or s.parent.name in ops]
            cuda_tasks = [(s, a, nvcc, report["nvcc"], use_cache) for a in archs for s in srcs]

    def note(records):
        if progress:
            for r in records:
                progress(r)
        return records

    jobs = max(1, jobs)
    # CUDA: nvcc subprocesses, from threads. Triton: compiles in this process (jobs == 1) or in
    # spawned worker processes (each compile sets environment variables and captures stdout, which
    # are per process).
    with ThreadPoolExecutor(max_workers=jobs) as threads:
        cuda_futures = [threads.submit(lambda t=t: note(compile_cuda(*t))) for t in cuda_tasks]
        if jobs == 1 or len(triton_tasks) <= 1:
            for i, a in triton_tasks:
                report["kernels"].extend(note([compile_triton(variants[i], a, use_cache)]))
        else:
            import multiprocessing

            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as procs:
                futures = [procs.submit(_triton_task, full, i, a, use_cache) for i, a in triton_tasks]
                for f in futures:
                    report["kernels"].extend(note([f.result()]))
        for f in cuda_futures:
            report["kernels"].extend(f.result())
    for r in report["kernels"]:
        r["problems"] = problems(r)
    return report


def format_table(records: list[dict]) -> str:
    cols = ["op", "backend", "kernel", "dtype", "arch", "config", "registers", "spill_bytes", "shared_bytes", "shared_limit", "status"]
    rows = []
    for r in records:
        status = "pruned" if r.get("pruned") else ("ok" if not r.get("problems") else "; ".join(r["problems"]))
        rows.append([str(r.get(c) if r.get(c) is not None else "-") if c != "status" else status for c in cols])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1])
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
