"""pytest plugin: one JSON line per test as soon as it ends, so a run cut short by its timeout still
leaves its results. bench/gpu.sh loads it with `-p bench.pytest_jsonl`; it writes only when the
environment names a file:
    VQDNA_TESTS_JSONL=FILE  VQDNA_TESTS_TAG=STEP (default "tests")
Line: {"kind": "test", "step", "nodeid", "when", "outcome", "seconds", "error"? (failures),
"reason"? (skips)}; the call phase of every test, and a setup/teardown phase that did not pass."""

from __future__ import annotations

import json
import os

_path = None
_tag = "tests"


def pytest_configure(config):
    global _path, _tag
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its reports reach the controller, which writes
        return
    _path = os.environ.get("VQDNA_TESTS_JSONL") or None
    _tag = os.environ.get("VQDNA_TESTS_TAG", "tests")


def pytest_runtest_logreport(report):
    if _path is None or (report.when != "call" and report.passed):
        return
    row = {"kind": "test", "step": _tag, "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.failed:
        row["error"] = report.longreprtext[-1500:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2])[:300]
    with open(_path, "a") as f:
        f.write(json.dumps(row) + "\n")
