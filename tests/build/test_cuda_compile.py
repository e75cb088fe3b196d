"""Compile checks for the CUDA sources (csrc/ops/<op>/cuda*): no GPU needed, only nvcc.

Every csrc/ops/<op>/*.cu must compile warning-free with nvcc for sm_80 and sm_90 with the build's flags,
and no kernel instantiation may spill registers (ptxas -v, -warn-spills); every csrc/ops/<op>/cuda*.cpp
must pass a host-compiler syntax check against torch's and CUDA's headers (-DVQDNA_WITH_CUDA); and
the launchers' host-side decisions in the headers (stem limits, EMA path, vector loads) must agree
with their Python mirror, vqdna/kernels/cuda_launch.py. Skipped when nvcc is not on PATH.
"""

import functools
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

from tests.build._setup_py import ROOT, setup_py

pytestmark = pytest.mark.nvcc

CSRC = ROOT / "csrc"
OPS_DIR = CSRC / "ops"
CU_SOURCES = sorted(OPS_DIR.glob("*/*.cu"))
CPP_SOURCES = sorted(OPS_DIR.glob("*/cuda*.cpp"))  # the CUDA-only host files (setup.py's rule)
ARCHS = ["sm_80", "sm_90"]
TIMEOUT_S = 300

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")

_WARNING_RE = re.compile(r"\bwarning\b", re.IGNORECASE)


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def _report(cmd, proc):
    return f"$ {' '.join(map(str, cmd))}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@functools.cache  # one nvcc -dryrun for every source's check
def _cuda_include_dir():
    """CUDA's include dir as the build sees it: the toolkit root setup.py gives torch's cpp_extension (nvcc's own
    TOP, right even when the nvcc on PATH is a wrapper script), else CUDA_HOME / CUDA_PATH."""
    for home in (setup_py()._cuda_home_from_nvcc(), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def test_sources_exist():
    assert CU_SOURCES, f"no .cu files under {OPS_DIR}"
    assert CPP_SOURCES, f"no cuda*.cpp files under {OPS_DIR}"


def ptxas_resources(text):
    """{kernel (mangled): {"registers", "spill_bytes", ...}} from nvcc -Xptxas -v output (the parser
    `vqdna gpu-check` uses)."""
    from vqdna.kernels.gpu_check import _parse_ptxas

    return {f["function"]: f for f in _parse_ptxas(text)}


def test_ptxas_resources_parses_a_spill():
    text = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'
ptxas info    : Function properties for _Z1kv
    72 bytes stack frame, 68 bytes spill stores, 108 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size, 444 bytes cmem[0]"""
    k = ptxas_resources(text)["_Z1kv"]
    assert (k["stack_bytes"], k["spill_bytes"], k["spill_loads"], k["registers"]) == (72, 68, 108, 255)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: str(p.relative_to(OPS_DIR)))
def test_nvcc_compiles(src, arch, tmp_path):
    """Warning-free with setup.py's nvcc flags, and no register spills in any kernel instantiation."""
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", f"-arch={arch}",
        "-Werror", "all-warnings", "-Xptxas", "-v,-warn-spills",
        f"-I{CSRC}",
        str(src), "-o", str(tmp_path / f"{src.parent.name}_{src.stem}_{arch}.o"),
    ]  # fmt: skip
    proc = _run(cmd)
    out = proc.stdout + proc.stderr
    kernels = ptxas_resources(out)
    spilled = {k: v for k, v in kernels.items() if v.get("spill_bytes") or v.get("spill_loads")}
    assert not spilled, f"{src.name} {arch}: register spills in {spilled}\n{_report(cmd, proc)}"
    assert proc.returncode == 0, _report(cmd, proc)
    assert kernels, f"ptxas -v reported no kernels\n{_report(cmd, proc)}"
    assert not _WARNING_RE.search(out), _report(cmd, proc)


@needs_nvcc
@pytest.mark.parametrize("src", CPP_SOURCES, ids=lambda p: str(p.relative_to(OPS_DIR)))
def test_host_syntax(src):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler found")
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    cuda_inc = _cuda_include_dir()
    assert cuda_inc is not None, f"could not locate CUDA's include dir from nvcc at {NVCC}"

    torch_incs = cpp_extension.include_paths()
    includes = [f"-I{CSRC}"]
    for inc in [*torch_incs, cuda_inc, sysconfig.get_paths().get("include", "")]:
        if inc and os.path.isdir(inc):
            includes += ["-isystem", inc]
    defines = ["-DVQDNA_WITH_CUDA"]
    # CPU-only torch wheels ship the c10/cuda headers without the generated cuda_cmake_macros.h
    # (it only sets a Windows export macro); tell CUDAMacros.h not to include it.
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in torch_incs):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", *defines, *includes, str(src)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    out = proc.stdout + proc.stderr
    assert not _WARNING_RE.search(out), _report(cmd, proc)


# The launchers' host-side decisions, compiled from the headers on the host and compared with the
# Python mirror (vqdna/kernels/cuda_launch.py) over a grid of sizes around every threshold.
_PLAN_PROGRAM = r"""
#include <cstdio>
#include "ops/ema_stats/cuda.cuh"
#include "ops/lookup/cuda.cuh"
#include "ops/stem/cuda.cuh"
using namespace vqdna::cuda;
int main() {
  std::printf("stem_limits %lld %lld\n", (long long)kStemMaxDim, (long long)kStemMaxWidth);
  const long long dims[] = {DIMS};
  const long long widths[] = {WIDTHS};
  for (long long d : dims)
    for (long long w : widths) std::printf("stem %lld %lld %lld\n", d, w, (long long)stem_table_bytes(d, w));
  const long long codes[] = {CODES};
  const long long smem[][2] = {SMEM};
  for (int t = 0; t < 3; ++t)
    for (long long d : dims)
      for (long long k : codes)
        for (const auto& s : smem)
          for (int al = 0; al < 4; ++al) {
            const EmaAtomicPlan p = ema_atomic_plan(d, k, static_cast<DType>(t), s[0], s[1], al & 1, al >> 1);
            std::printf("ema %d %lld %lld %lld %lld %d %d %d %d %lld %lld %d\n", t, d, k, s[0], s[1], al & 1, al >> 1,
                        (int)p.smem_table, p.group_log2, (long long)p.table_bytes, (long long)p.col_tiles, (int)p.vec);
          }
  for (int t = 0; t < 3; ++t)
    for (long long d : dims)
      for (int al = 0; al < 2; ++al)
        std::printf("mma %d %lld %d %d\n", t, d, al, (int)mma_vec_loads(static_cast<DType>(t), d, al));
  return 0;
}
"""


def _host_cxx():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@needs_nvcc
def test_launch_plans_match_python_mirror(tmp_path):
    """stem_table_bytes / kStemMaxDim / kStemMaxWidth (ops/stem/cuda.cuh), ema_atomic_plan (ops/ema_stats/cuda.cuh) and
    mma_vec_loads (common/cuda_search_plan.h) give what vqdna.kernels.cuda_launch says, for every dtype and sizes
    on both sides of each threshold (shared-memory budgets of sm_80 and sm_90)."""
    import torch

    from vqdna.kernels import cuda_launch as cl

    cxx = _host_cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler found")
    cuda_inc = _cuda_include_dir()
    assert cuda_inc is not None, f"could not locate CUDA's include dir from nvcc at {NVCC}"
    dims = [1, 2, 3, 4, 7, 8, 9, 16, 17, 24, 31, 64, 100, 129, 384, 513, 1024, 1030, 2048, 4096]
    widths = [1, 3, 5, 9, 33, 65, 1023]
    codes = [1, 7, 64, 512, 1000, 1023, 1024, 3418, 3419, 4096, 8192, 65536, 1 << 20]
    smem = [(cl.SMEM_PER_SM[a], cl.SMEM_OPTIN[a]) for a in ("sm_80", "sm_90")] + [(65536, 49152)]
    source = (_PLAN_PROGRAM.replace("DIMS", ", ".join(map(str, dims))).replace("WIDTHS", ", ".join(map(str, widths)))
              .replace("CODES", ", ".join(map(str, codes)))
              .replace("SMEM", ", ".join(f"{{{a}, {b}}}" for a, b in smem)))
    (tmp_path / "plans.cpp").write_text(source)
    exe = tmp_path / "plans"
    cmd = [cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", "-isystem", cuda_inc,
           str(tmp_path / "plans.cpp"), "-o", str(exe)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)

    dtypes = [torch.float32, torch.bfloat16, torch.float16]  # DType 0, 1, 2
    want = [f"stem_limits {cl.STEM_MAX_DIM} {cl.STEM_MAX_WIDTH}"]
    want += [f"stem {d} {w} {cl.stem_table_bytes(d, w)}" for d in dims for w in widths]
    for t, dtype in enumerate(dtypes):
        for d in dims:
            for k in codes:
                for per_sm, optin in smem:
                    for al in range(4):
                        p = cl.ema_atomic_plan(d, k, dtype, per_sm, optin, bool(al & 1), bool(al >> 1))
                        want.append(f"ema {t} {d} {k} {per_sm} {optin} {al & 1} {al >> 1} {int(p.smem_table)} "
                                    f"{p.group_log2} {p.table_bytes} {p.col_tiles} {int(p.vec)}")
    want += [f"mma {t} {d} {al} {int(cl.mma_vec_loads(dtype, d, bool(al)))}"
             for t, dtype in enumerate(dtypes) for d in dims for al in range(2)]
    got = run.stdout.splitlines()
    assert len(got) == len(want)
    diff = [(g, w) for g, w in zip(got, want) if g != w]
    assert not diff, f"{len(diff)} of {len(want)} decisions differ (C++, Python); first: {diff[:5]}"
