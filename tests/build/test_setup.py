"""setup.py's build helpers: the CUDA toolkit root for torch's cpp_extension, found from the nvcc on PATH even when
that nvcc is a wrapper script outside the toolkit (as on this project's CPU machines)."""

import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.build._setup_py import setup_py


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_cuda_home_is_nvccs_top_not_the_wrappers_folder(tmp_path, monkeypatch):
    """A wrapper `nvcc` in bin/ of a folder with no CUDA headers exec's the toolkit's: CUDA_HOME is the toolkit (the
    folder above the wrapper, torch's guess, would fail the build on `cuda_runtime.h: No such file`)."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    _executable(toolkit / "bin" / "nvcc", f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    wrapper = tmp_path / "local" / "bin"
    wrapper.mkdir(parents=True)
    _executable(wrapper / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{wrapper}{os.pathsep}{os.environ['PATH']}")
    assert setup_py()._cuda_home_from_nvcc() == os.path.realpath(toolkit)


def test_cuda_home_is_none_without_a_toolkit(tmp_path, monkeypatch):
    """No nvcc, or an nvcc whose TOP holds no cuda_runtime.h: None (torch's own search then applies)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    setup = setup_py()
    assert setup._cuda_home_from_nvcc() is None
    _executable(tmp_path / "nvcc", f'#!/bin/sh\necho "#$ TOP={tmp_path}" >&2\n')
    assert setup._cuda_home_from_nvcc() is None


@pytest.mark.nvcc
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
def test_cuda_home_of_this_machines_nvcc():
    home = setup_py()._cuda_home_from_nvcc()
    assert home is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
