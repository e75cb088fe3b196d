"""bench/gpu.sh: the GPU verification script. No GPU here: its steps are checked with --dry-run,
and the whole pipeline runs in its CPU mode (behind `slow`)."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_dry_run_lists_every_step(tmp_path, monkeypatch):
    # The device named by env, as on a machine without the GPU: no Python runs in a dry run then.
    monkeypatch.setenv("VQDNA_BENCH_DEVICE_NAME", "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("VQDNA_CUDA_ARCHS", "9.0")
    out = _run("--dry-run", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    text = "\n".join(steps)
    assert "VQDNA_BUILD_CUDA=1 VQDNA_CUDA_ARCHS=9.0" in steps[0] and "build_ext --inplace" in steps[0]
    assert "cuda_ops_available" in steps[1]
    assert "pytest -q -m cuda tests" in text
    assert "pytest bench -q -m cuda" in text and "--vqdna-size full" in text
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    assert f"--vqdna-results '{tmp_path}/nvidia-h100-80gb-hbm3-{date}.json'" in text
    assert "--write-table" in text and "--plot" in text
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_bad_arguments_are_refused():
    out = _run("--size", "huge")
    assert out.returncode == 2 and "--size must be" in out.stderr
    out = _run("--frobnicate")
    assert out.returncode == 2 and "unknown argument" in out.stderr


@pytest.mark.slow
def test_cpu_mode_writes_results_and_table(tmp_path):
    out = _run("--device", "cpu", "--size", "tiny", "--skip-tests", "--select", "lookup-cpu-float32-N1024-K64",
               "--results", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (result,) = tmp_path.glob("*-2*.json")
    data = json.loads(result.read_text())
    assert {"device", "torch", "triton", "commit", "command", "results"} <= set(data)
    assert {r["backend"] for r in data["results"]} >= {"native", "reference", "torch"}
    assert result.with_suffix(".md").exists() and result.with_suffix(".png").exists()
    table = json.loads((tmp_path / "backend_table.json").read_text())
    entries = table["devices"][f"cpu/{data['device_name']}"]["entries"]
    # the run's (op, dtype) replaced the packaged points of that pair; the packaged others stay
    assert [(e["N"], e["K"]) for e in entries if (e["op"], e["dtype"]) == ("lookup", "float32")] == [(1024, 64)]
    packaged = json.loads((ROOT / "vqdna" / "kernels" / "backend_table.json").read_text())
    others = [e for dev in packaged["devices"].values() if dev["device_name"] == data["device_name"]
              for e in dev["entries"] if (e["op"], e["dtype"]) != ("lookup", "float32")]
    assert all(e in entries for e in others)
    assert (tmp_path / f"suite-{result.stem.rsplit('-', 1)[0]}.log").exists()
