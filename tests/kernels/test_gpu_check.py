"""vqdna.kernels.gpu_check / `vqdna gpu-check`: ahead-of-time compiles of the GPU kernels, no GPU needed.

The default run compiles the representative Triton subset for sm_80 and sm_90 (the first and the last
variant of each kernel and dtype; about a minute on 2 cores, results cached in ~/.cache/vqdna); the
CUDA sources' resource checks run in tests/build (nvcc). `-m slow` runs the whole check, both backends.
"""

import json
import os
import subprocess
import sys

import pytest

from vqdna.kernels import gpu_check

triton = pytest.importorskip("triton")

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    112 bytes stack frame, 184 bytes spill stores, 196 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 24 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_ptxas_reads_each_function():
    foo, bar = gpu_check._parse_ptxas(PTXAS_LOG)
    assert foo == {"function": "_Z3fooPf", "arch": "sm_80", "registers": 128, "spill_bytes": 184,
                   "spill_loads": 196, "stack_bytes": 112, "static_shared": 24}  # fmt: skip
    assert bar["registers"] == 40 and bar["spill_bytes"] == 0 and bar["static_shared"] == 0 and bar["arch"] == "sm_90"


def test_parse_arch():
    assert gpu_check.parse_arch("sm_80,sm_90") == [80, 90]
    assert gpu_check.parse_arch("8.0;9.0") == [80, 90]
    assert gpu_check.parse_arch("90a") == [90]
    with pytest.raises(ValueError, match="sm_x"):
        gpu_check.parse_arch("sm_x")


def test_short_kernel_names():
    assert gpu_check._short_kernel(
        "void vqdna::cuda::(anonymous namespace)::hrq_kernel<__nv_bfloat16, true>(vqdna::cuda::HrqParams)"
    ) == ("hrq_kernel", "bf16", "<__nv_bfloat16, true>")
    assert gpu_check._short_kernel("void vqdna::cuda::stem_kernel<64>(void const*)")[:2] == ("stem_kernel", "-")


def _record(**kw):
    base = {"op": "lookup", "backend": "triton", "kernel": "k", "dtype": "bf16", "arch": "sm_80", "config": "",
            "ok": True, "error": None, "registers": 200, "spill_bytes": 0, "shared_bytes": 1000,
            "shared_limit": 166_912, "shared_estimate": 2000, "pruned": False}  # fmt: skip
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "record,why",
    [
        (_record(), None),
        (_record(ok=False, error="ptxas error: too much shared data"), "compile error"),
        (_record(shared_bytes=200_000, shared_estimate=None), "over the sm limit"),
        (_record(shared_bytes=3000), "over the pruning estimate"),
        (_record(spill_bytes=8), "no 16-bit Triton kernel may spill"),
        (_record(dtype="fp32", spill_bytes=gpu_check.FP32_TRITON_SPILL_CAP_BYTES), None),
        (_record(dtype="fp32", spill_bytes=gpu_check.FP32_TRITON_SPILL_CAP_BYTES + 4), "float32 cap"),
        (_record(backend="cuda", dtype="fp32", spill_bytes=4, shared_estimate=None), "no CUDA kernel may spill"),
        (_record(pruned=True, shared_bytes=None, registers=None, spill_bytes=None), None),
    ],
)
def test_problems(record, why):
    found = gpu_check.problems(record)
    if why is None:
        assert found == []
    else:
        assert len(found) == 1 and why in found[0]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env


def _gpu_check(tmp_path, *args, timeout=1500):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vqdna.cli", "gpu-check", "--arch", "sm_80,sm_90", "--json", str(out), "--jobs", "2", *args],
        capture_output=True, text=True, env=_env(), timeout=timeout,
    )  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def _check_report(proc, report, backends):
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = [r for r in report["kernels"] if r["problems"]]
    assert proc.returncode == 0 and not failed, gpu_check.format_table(failed) + proc.stderr[-2000:]
    assert report["triton"] == triton.__version__ and report["archs"] == ["sm_80", "sm_90"]
    fields = {"op", "backend", "kernel", "dtype", "arch", "config", "ok", "error", "registers", "spill_bytes",
              "shared_bytes", "shared_limit"}  # fmt: skip
    for r in report["kernels"]:
        assert fields <= set(r)
    triton_rows = [r for r in report["kernels"] if r["backend"] == "triton"]
    if "triton" in backends:
        # Every op's kernels were compiled (not only pruned) for both architectures.
        for op in ("lookup", "quantize", "hrq_quantize", "ema_stats", "stem"):
            for arch in ("sm_80", "sm_90"):
                assert any(r["op"] == op and r["arch"] == arch and not r.get("pruned") for r in triton_rows), (op, arch)
        # 16-bit Triton variants really are spill-free, and registers were read.
        assert all(r["registers"] for r in triton_rows if not r.get("pruned"))


def test_gpu_check_triton_subset(tmp_path):
    proc, report = _gpu_check(tmp_path, "--backend", "triton", "--subset")
    _check_report(proc, report, {"triton"})
    assert "kernels checked" in proc.stdout


def test_gpu_check_exits_nonzero_on_a_spill(tmp_path, monkeypatch):
    """A record with a spill fails the command (the exit status CI relies on)."""
    from vqdna.commands import gpu_check as command

    def fake_run_check(**kwargs):
        rows = [_record(spill_bytes=16)]
        for r in rows:
            r["problems"] = gpu_check.problems(r)
        return {"triton": "x", "nvcc": None, "archs": ["sm_80"], "full": True, "kernels": rows}

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gpu_check, "run_check", fake_run_check)
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--arch", "sm_80", "--json", str(tmp_path / "r.json")])) == 1
    assert json.loads((tmp_path / "r.json").read_text())["kernels"][0]["spill_bytes"] == 16


@pytest.mark.slow
@pytest.mark.nvcc
def test_gpu_check_everything(tmp_path):
    """The issue's acceptance command: every Triton variant and every CUDA instantiation, both archs."""
    proc, report = _gpu_check(tmp_path, timeout=3600)
    if report is not None and report.get("nvcc") is None:
        pytest.skip("nvcc not found on PATH")
    _check_report(proc, report, {"triton", "cuda"})
    assert any(r["backend"] == "cuda" for r in report["kernels"])
