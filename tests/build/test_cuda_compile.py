"""Compile checks for the CUDA sources (csrc/cuda): no GPU needed, only nvcc.

Every csrc/cuda/*.cu must compile warning-free with nvcc for sm_80 and sm_90, and every
csrc/cuda/*.cpp must pass a host-compiler syntax check against torch's and CUDA's headers
(-DVQDNA_WITH_CUDA). Skipped when nvcc is not on PATH.
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.nvcc

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
CPP_SOURCES = sorted(CUDA_DIR.glob("*.cpp"))
ARCHS = ["sm_80", "sm_90"]
TIMEOUT_S = 300

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")

_WARNING_RE = re.compile(r"\bwarning\b", re.IGNORECASE)


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def _report(cmd, proc):
    return f"$ {' '.join(map(str, cmd))}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def _cuda_include_dir():
    """CUDA's include dir, found from nvcc (which may be a wrapper script) or CUDA_HOME."""
    candidates = []
    # nvcc's own view of its include dir (robust to wrapper scripts and symlinks).
    try:
        proc = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        for m in re.finditer(r'INCLUDES="([^"]*)"', proc.stdout + proc.stderr):
            candidates += [p[2:] for p in m.group(1).split() if p.startswith("-I")]
    except (OSError, subprocess.SubprocessError):
        pass
    real = Path(os.path.realpath(NVCC))
    candidates.append(str(real.parent.parent / "include"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_runtime_api.h")):
            return c
    return None


def test_sources_exist():
    assert CU_SOURCES, f"no .cu files under {CUDA_DIR}"
    assert CPP_SOURCES, f"no .cpp files under {CUDA_DIR}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, arch, tmp_path):
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}",
        "-Werror", "all-warnings",
        f"-I{CSRC}",
        str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o"),
    ]  # fmt: skip
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    out = proc.stdout + proc.stderr
    assert not _WARNING_RE.search(out), _report(cmd, proc)


@needs_nvcc
@pytest.mark.parametrize("src", CPP_SOURCES, ids=lambda p: p.name)
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
