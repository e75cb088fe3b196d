"""bench/gpu.sh, the one-call GPU bring-up, and its parts (bench/gpu_smoke.py, gpu_timings.py,
gpu_summary.py, pytest_jsonl.py). No GPU here: the steps are checked with --dry-run, and the
pipeline runs in its CPU mode with small budgets (the whole of it behind `slow`)."""

import datetime
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"
sys.path.insert(0, str(ROOT))
from bench import gpu_summary  # noqa: E402


def _env(**extra):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **extra}
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the CPU smoke then runs native, reference and auto only
    return env


def _run(*args, timeout=600, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=_env(**env), timeout=timeout, cwd=ROOT)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _steps(rows):
    return {r["step"]: r for r in rows if r["kind"] == "step"}


def test_dry_run_lists_every_step_in_order(tmp_path, monkeypatch):
    # The device named by env, as on a machine without the GPU: no Python runs in a dry run then.
    monkeypatch.setenv("VQDNA_BENCH_DEVICE_NAME", "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("VQDNA_CUDA_ARCHS", "9.0")
    out = _run("--dry-run", "--results", str(tmp_path), "--budget", "300")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    order = [line.split()[1].rstrip(":") for line in lines if line.startswith("=== ")]
    assert order == ["env", "build", "smoke", "memcheck", "racecheck", "tests", "timings", "tests-triton", "suite", "table"]
    timeouts = {line.split()[1].rstrip(":"): int(line.split()[3]) for line in lines if line.startswith("=== ") and "timeout" in line}
    assert timeouts["build"] == 300 * 45 // 100 and timeouts["smoke"] == 300 * 30 // 100  # shares of the budget
    assert max(timeouts.values()) <= 300 - 10 - 5  # never past the budget less the summary and the kill grace
    commands = [line for line in lines if line.startswith("+ ")]
    text = "\n".join(commands)
    assert "VQDNA_BUILD_CUDA=1 VQDNA_CUDA_ARCHS=9.0" in commands[0] and "MAX_JOBS=" in commands[0] and "build_ext --inplace" in commands[0]
    assert "pip" not in commands[0] and "cuda_ops_available" in commands[1]
    assert "gpu_smoke.py --device cuda --backends cuda,auto" in text and "--backends triton" in text
    assert "compute-sanitizer --tool memcheck" in text and "compute-sanitizer --tool racecheck" in text
    assert "pytest -q -m cuda tests -k not\\ triton-cuda" in text and f"--junitxml={tmp_path}/tests.xml" in text
    assert "gpu_timings.py --device cuda --backends cuda,triton" in text
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    assert "pytest bench -q -m cuda" in text and "--vqdna-size full" in text
    assert f"--vqdna-results {tmp_path}/nvidia-h100-80gb-hbm3-{date}.json" in text and "--write-table" in text
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_bad_arguments_are_refused(tmp_path):
    for args, message in ((["--size", "huge"], "--size must be"), (["--frobnicate"], "unknown argument"),
                          (["--budget", "soon"], "--budget must be"), (["--device", "tpu"], "--device must be")):
        out = _run(*args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    (tmp_path / "results.jsonl").write_text("{}\n")
    out = _run("--device", "cpu", "--results", str(tmp_path))
    assert out.returncode == 2 and "already holds" in out.stderr
    assert (tmp_path / "results.jsonl").read_text() == "{}\n", "an earlier run's results are left alone"


def test_step_killed_by_its_timeout_leaves_earlier_results_and_summary_in_eight_files(tmp_path):
    # The smoke hangs on its 8th case: its timeout (30% of the budget: room for a slow import) stops it; the 7 lines before stay,
    # the step is recorded as timed out, the run goes on to the end and the summary says all of it.
    # Stray files (a plot, a second log) beyond the 8 the device tool brings back go into extras.tar.gz.
    for i in range(9):
        (tmp_path / f"stray{i}.txt").write_text(str(i))
    out = _run("--device", "cpu", "--budget", "100", "--results", str(tmp_path), "--skip-timings", "--skip-tests", "--skip-suite",
               VQDNA_SMOKE_ARGS="--dtypes float32 --only lookup/native/* --inject-hang lookup/native/float32/nonfinite")
    assert out.returncode in (124, 137), out.stdout[-3000:] + out.stderr[-3000:]  # timeout's SIGINT, or its SIGKILL 5 s later
    rows = _lines(tmp_path / "results.jsonl")
    smoke = [r for r in rows if r["kind"] == "smoke"]
    assert [r["case"].split("/")[-1] for r in smoke] == ["N1K7D19", "N300K700D130", "N3K1D1", "N300K1D130", "misaligned-D384",
                                                         "misaligned-D130", "ties"]
    assert all(r["status"] == "pass" for r in smoke)
    steps = _steps(rows)
    assert steps["env"]["status"] == 0 and steps["smoke"]["timed_out"] is True and steps["smoke"]["status"] == out.returncode
    assert steps["smoke"]["seconds"] <= steps["smoke"]["timeout_s"] + 6
    assert steps["done"]["status"] == out.returncode and steps["done"]["seconds"] <= 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["smoke"]["smoke-native+reference+auto"] == {"pass": 7, "fail": 0, "refused": 0, "failures": [], "refusals": []}
    assert f"| smoke | {out.returncode} |" in (tmp_path / "summary.md").read_text() and "TIMED OUT" in (tmp_path / "summary.md").read_text()
    assert summary["env"]["torch"] and summary["env"]["tree_sha256"]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["extras.tar.gz", "log.txt", "results.jsonl", "summary.json", "summary.md"] and summary["files"] == files
    with tarfile.open(tmp_path / "extras.tar.gz") as tar:
        assert sorted(tar.getnames()) == [f"stray{i}.txt" for i in range(9)]


def test_smoke_records_a_failure_and_runs_on(tmp_path, capsys):
    from bench import gpu_smoke

    jsonl = tmp_path / "smoke.jsonl"
    rc = gpu_smoke.main(["--device", "cpu", "--backends", "native", "--quick", "--dtypes", "float32", "--only", "lookup/*",
                         "--inject-failure", "*/ties", "--jsonl", str(jsonl), "--tag", "t"])
    assert rc == 1
    rows = _lines(jsonl)
    assert [r["case"].split("/")[-1] for r in rows] == ["N1K7D19", "N300K700D130", "N3K1D1", "N300K1D130", "misaligned-D384",
                                                        "misaligned-D130", "ties", "nonfinite"]
    assert {r["step"] for r in rows} == {"t"} and all(r["backend"] == "native" for r in rows)
    failed = [r for r in rows if r["status"] == "fail"]
    assert [r["case"] for r in failed] == ["lookup/native/float32/ties"] and "injected failure" in failed[0]["error"]
    assert rows[-1]["status"] == "pass", "the case after the failure still ran"
    assert "7 passed, 1 failed" in capsys.readouterr().out


def test_smoke_fails_a_backend_that_answers_wrong(tmp_path, monkeypatch, capsys):
    from bench import gpu_smoke
    from vqdna.kernels import reference
    from vqdna.kernels.ops import registry

    def off_by_one(z, codebook, sqnorm):  # the nearest code's neighbour: a plausible indexing bug
        codes, dist = reference.lookup(z, codebook, sqnorm)
        return (codes + 1) % codebook.shape[0], dist

    monkeypatch.setitem(registry._ops, ("lookup", "reference"), off_by_one)
    jsonl = tmp_path / "smoke.jsonl"
    assert gpu_smoke.main(["--device", "cpu", "--backends", "reference", "--dtypes", "float32", "--only",
                           "lookup/reference/float32/N300K700D130", "--jsonl", str(jsonl)]) == 1
    (row,) = _lines(jsonl)
    assert row["status"] == "fail" and "farther than the nearest" in row["error"]


def test_smoke_catches_a_wrong_backend():
    # The checks themselves fail on a wrong answer (here: the nearest code's neighbour).
    import torch

    from bench.gpu_smoke import check_nearest

    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(20, 7, generator=g), torch.randn(30, 7, generator=g)
    exact = ((z[:, None] - e[None]) ** 2).sum(-1)
    codes, dist = exact.argmin(1), exact.min(1).values
    check_nearest(z, e, codes, dist)
    wrong = codes.clone()
    wrong[4] = exact[4].argsort()[1]
    with pytest.raises(AssertionError, match="row 4"):
        check_nearest(z, e, wrong, dist)


def test_summary_survives_a_line_cut_by_a_kill(tmp_path):
    lines = [{"kind": "step", "step": "smoke", "status": 0, "seconds": 3, "timeout_s": 9, "timed_out": False},
             {"kind": "smoke", "step": "smoke-cuda", "case": "lookup/cuda/float32/N1", "status": "fail", "error": "AssertionError: x"},
             {"kind": "timing", "point": "lookup/K4096/cuda", "status": "pass", "ms": 2.0, "tflops": 400.0,
              "fraction_of_peak": 0.5, "speedup_vs_torch": 2.5, "target": "t", "met": False},
             {"kind": "test", "step": "tests", "nodeid": "a::b", "when": "call", "outcome": "failed", "error": "E boom"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "smo')
    assert gpu_summary.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["unreadable_lines"][0]["line"] == 5 and not summary["complete"]
    assert summary["smoke"]["smoke-cuda"]["failures"][0]["case"] == "lookup/cuda/float32/N1"
    assert summary["tests"]["tests"]["outcomes"] == {"failed": 1}
    assert summary["targets"]["missed"][0]["point"] == "lookup/K4096/cuda"
    md = (tmp_path / "summary.md").read_text()
    assert "cut short" in md and "50.0%" in md and "missed lookup/K4096/cuda" in md


def test_pytest_plugin_writes_a_line_per_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\ndef test_ok(): pass\ndef test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skip(): pass\n")
    jsonl = tmp_path / "t.jsonl"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_jsonl", str(tmp_path)],
                         capture_output=True, text=True, env=_env(VQDNA_TESTS_JSONL=str(jsonl), VQDNA_TESTS_TAG="x"), cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    rows = {r["nodeid"].split("::")[-1]: r for r in _lines(jsonl)}
    assert set(rows) == {"test_ok", "test_bad", "test_skip"} and {r["step"] for r in rows.values()} == {"x"}
    assert rows["test_ok"]["outcome"] == "passed" and rows["test_bad"]["outcome"] == "failed" and "assert 1 == 2" in rows["test_bad"]["error"]
    assert rows["test_skip"]["outcome"] == "skipped" and "not here" in rows["test_skip"]["reason"]


@pytest.mark.slow
def test_cpu_mode_end_to_end(tmp_path):
    out = _run("--device", "cpu", "--budget", "420", "--results", str(tmp_path), "--select", "lookup-cpu-float32-N1024-K64",
               VQDNA_SMOKE_ARGS="--dtypes float32,bfloat16", VQDNA_TIMINGS_ARGS="--repeats 3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _lines(tmp_path / "results.jsonl")
    steps = _steps(rows)
    assert [s for s, r in steps.items() if r["status"] == 0] == ["env", "smoke", "tests", "timings", "tests-triton", "suite", "table", "done"]
    assert steps["build"]["skipped"] and steps["memcheck"]["skipped"]
    smoke = [r for r in rows if r["kind"] == "smoke"]
    assert smoke and all(r["status"] == "pass" for r in smoke) and {r["backend"] for r in smoke} == {"native", "reference", "auto"}
    timings = {r["point"]: r for r in rows if r["kind"] == "timing"}
    assert all(r["status"] == "pass" for r in timings.values()) and "mlm/bert-tiny" in timings and "limits/matmul" in timings
    assert any(r["kind"] == "test" and r["outcome"] == "skipped" for r in rows), "the CUDA tests ran (and skipped)"
    assert any(r["kind"] == "bench" for r in rows), "the suite's points as JSON lines"
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8 and "tests.xml" in files and "backend_table.json" in files
    (suite,) = [f for f in files if f.endswith(".json") and f not in ("summary.json", "backend_table.json")]
    assert {"device", "torch", "commit", "command", "results"} <= set(json.loads((tmp_path / suite).read_text()))
