"""Build vqdna._C from csrc/.

Environment switches:
  VQDNA_BUILD_EXT=0        pure-Python install (no extension; reference and Triton paths only)
  VQDNA_BUILD_CUDA=auto|0|1
                           auto (default): build the CUDA ops when torch has CUDA and nvcc is found;
                           1: require them (error if impossible); 0: skip them
  VQDNA_CUDA_ARCHS="8.0;9.0"
                           CUDA architectures (sets TORCH_CUDA_ARCH_LIST; default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (default: from free memory, nvcc needs ~3 GB a job)
"""

import glob
import os
import shutil

from setuptools import setup


def _max_jobs() -> str:
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        free_gb = info.get("MemAvailable", 0) / 2**20
    except OSError:
        free_gb = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 3))))


def _cuda_home_from_nvcc():
    """The CUDA toolkit root as the nvcc on PATH reports it (its TOP, from `nvcc -dryrun`), or None.

    torch's cpp_extension takes CUDA_HOME, when unset, as the folder above nvcc's: wrong when that nvcc is a
    wrapper outside the toolkit (here /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc), where the
    build then fails on `cuda_runtime.h: No such file` in the first cuda*.cpp (seen building against torch
    2.11+cu130, the lent GPU machines' stack)."""
    import re
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if top is None:
        return None
    home = os.path.realpath(top.group(1).strip())
    return home if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) else None


def _extensions():
    if os.environ.get("VQDNA_BUILD_EXT", "1") == "0":
        print("vqdna: VQDNA_BUILD_EXT=0, building a pure-Python package")
        return [], {}
    want_cuda = os.environ.get("VQDNA_BUILD_CUDA", "auto").lower()
    if want_cuda not in ("0", "false", "no") and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _cuda_home_from_nvcc()  # before cpp_extension is imported: it reads CUDA_HOME at import
        if home:
            os.environ["CUDA_HOME"] = home
    import torch
    from torch.utils import cpp_extension

    os.environ["MAX_JOBS"] = _max_jobs()
    here = os.path.dirname(os.path.abspath(__file__))
    # Every C++ file under csrc/ (csrc/module.cpp, csrc/ops/<op>/*.cpp); the CUDA-only ones are
    # named cuda*.{cu,cpp} (csrc/ops/<op>/cuda.cu, cuda_binding.cpp), so a new op or backend needs no
    # edit here.
    every = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    sources = [s for s in every if not os.path.basename(s).startswith("cuda")]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v3" if _is_x86() else "-mcpu=native"]
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    nvcc = cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None
    has_cuda_torch = torch.version.cuda is not None
    build_cuda = want_cuda in ("1", "true", "yes") or (want_cuda == "auto" and nvcc and has_cuda_torch)
    if want_cuda in ("1", "true", "yes") and not (nvcc and has_cuda_torch):
        raise RuntimeError(
            "VQDNA_BUILD_CUDA=1 but the CUDA ops cannot be built: "
            f"nvcc found={nvcc}, torch CUDA version={torch.version.cuda}"
        )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("VQDNA_CUDA_ARCHS", "8.0;9.0"))
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                          + [s for s in every if os.path.basename(s).startswith("cuda")])
        define_macros.append(("VQDNA_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    print(f"vqdna: building vqdna._C (CUDA ops: {'yes' if build_cuda else 'no'}, MAX_JOBS={os.environ['MAX_JOBS']})")
    ext = ext_cls(
        name="vqdna._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import the helpers
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
