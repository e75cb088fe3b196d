"""The summary of a bench/gpu.sh run, from its JSON lines: summary.json and summary.md beside them.

    python3 bench/gpu_summary.py RESULTS_DIR

Reads RESULTS_DIR/results.jsonl (lines of kind env, step, smoke, test, timing, bench; see
bench/gpu.sh) and writes, per step, its status, time and timeout; the smoke cases (pass, fail,
refused, with each failure's error); the tests' outcomes and failures; every timed point with its
rate, fraction of the measured limit and target; the targets met and missed; the suite's point count.
Standard library only, and run after every step: a run cut short still has a summary of what it did.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

MAX_LISTED = 60  # failures listed per section (all of them are in results.jsonl)


def read_lines(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # a line cut by a kill: say where, keep the rest
                rows.append({"kind": "unreadable", "line": number, "error": str(exc)})
    return rows


def _rate(row: dict) -> str:
    for key, unit, scale in (("tflops", "TFLOP/s", 1), ("gbps", "GB/s", 1), ("bases_per_s", "M bases/s", 1e-6),
                             ("steps_per_s", "steps/s", 1)):
        if row.get(key) is not None:
            return f"{row[key] * scale:.4g} {unit}"
    if row.get("agreement_per_level"):
        return "agreement " + ", ".join(f"{a:.4f}" for a in row["agreement_per_level"])
    return "-"


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if r.get("kind") == "step"]
    env = next((r for r in rows if r.get("kind") == "env"), None)
    out: dict = {"env": env, "steps": steps, "complete": any(s.get("step") == "done" for s in steps)}
    unreadable = [r for r in rows if r.get("kind") == "unreadable"]
    if unreadable:
        out["unreadable_lines"] = unreadable

    smoke: dict = {}
    for r in rows:
        if r.get("kind") == "smoke":
            s = smoke.setdefault(r.get("step", "smoke"), {"pass": 0, "fail": 0, "refused": 0, "failures": [], "refusals": []})
            s[r["status"]] = s.get(r["status"], 0) + 1
            if r["status"] == "fail" and len(s["failures"]) < MAX_LISTED:
                s["failures"].append({"case": r["case"], "error": str(r.get("error", ""))[:400]})
            if r["status"] == "refused":
                s["refusals"].append({"case": r["case"], "error": str(r.get("error", ""))[:200]})
    out["smoke"] = smoke

    tests: dict = {}
    for r in rows:
        if r.get("kind") == "test":
            t = tests.setdefault(r.get("step", "tests"), {"outcomes": Counter(), "failures": []})
            t["outcomes"][r["outcome"] if r["when"] == "call" or r["outcome"] != "failed" else "error"] += 1
            if r["outcome"] == "failed" and len(t["failures"]) < MAX_LISTED:
                t["failures"].append({"nodeid": r["nodeid"], "when": r["when"], "error": str(r.get("error", ""))[-400:]})
    out["tests"] = {k: {"outcomes": dict(v["outcomes"]), "failures": v["failures"]} for k, v in tests.items()}

    timings = [r for r in rows if r.get("kind") == "timing"]
    out["timings"] = [{k: r.get(k) for k in ("point", "status", "backend", "dtype", "shape", "ms", "fraction_of_peak",
                                             "speedup_vs_torch", "ratio_to_lookups", "target", "met", "error")
                       if r.get(k) is not None} | {"rate": _rate(r)} for r in timings]
    out["targets"] = {
        "met": [r["point"] for r in timings if r.get("met") is True],
        "missed": [{"point": r["point"], "fraction_of_peak": r.get("fraction_of_peak"), "speedup_vs_torch": r.get("speedup_vs_torch"),
                    "ratio_to_lookups": r.get("ratio_to_lookups"), "rate": _rate(r), "target": r.get("target")}
                   for r in timings if r.get("met") is False],
    }
    out["suite_points"] = sum(1 for r in rows if r.get("kind") == "bench")
    return out


def markdown(summary: dict, files: list[str]) -> str:
    lines = ["# bench/gpu.sh summary", ""]
    env = summary.get("env") or {}
    for key in ("device", "capability", "driver", "torch", "cuda", "triton", "transformers", "python", "nvcc", "commit", "tree_sha256", "command", "date"):
        if env.get(key):
            lines.append(f"- {key}: {env[key]}")
    lines += ["", f"Run complete: {'yes' if summary['complete'] else 'NO (cut short; what finished is below)'}", "",
              "## Steps", "", "| step | status | seconds | timeout s | note |", "| --- | --- | --- | --- | --- |"]
    for s in summary["steps"]:
        note = s.get("skipped") or ("TIMED OUT" if s.get("timed_out") else "") + (f" {s['note']}" if s.get("note") else "")
        lines.append(f"| {s.get('step')} | {'-' if s.get('status') is None else s['status']} | {s.get('seconds', '-')} | {s.get('timeout_s', '-')} | {note.strip()} |")
    if summary["smoke"]:
        lines += ["", "## Smoke correctness", ""]
        for step, s in summary["smoke"].items():
            lines.append(f"- {step}: {s['pass']} passed, {s['fail']} failed, {s['refused']} refused")
            lines += [f"  - FAIL {f['case']}: {f['error']}" for f in s["failures"]]
            lines += [f"  - refused {f['case']}: {f['error']}" for f in s["refusals"]]
    if summary["tests"]:
        lines += ["", "## Tests", ""]
        for step, t in summary["tests"].items():
            lines.append(f"- {step}: " + ", ".join(f"{n} {k}" for k, n in sorted(t["outcomes"].items())))
            lines += [f"  - {f['nodeid']} ({f['when']}): {f['error'].splitlines()[-1] if f['error'] else ''}" for f in t["failures"]]
    if summary["timings"]:
        lines += ["", "## Timed points", "", "| point | ms | rate | of limit | vs torch | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in summary["timings"]:
            if t.get("status") == "fail":
                lines.append(f"| {t['point']} | FAILED | {t.get('error', '')[:120]} | | | | |")
                continue
            frac = f"{100 * t['fraction_of_peak']:.1f}%" if t.get("fraction_of_peak") is not None else "-"
            vs = f"{t['speedup_vs_torch']:.2f}x" if t.get("speedup_vs_torch") else (f"{t['ratio_to_lookups']:.2f}x lookups" if t.get("ratio_to_lookups") else "-")
            met = {True: "yes", False: "NO"}.get(t.get("met"), "")
            lines.append(f"| {t['point']} | {t.get('ms', 0):.4g} | {t['rate']} | {frac} | {vs} | {t.get('target', '')} | {met} |")
        missed = summary["targets"]["missed"]
        lines += ["", f"Targets met: {len(summary['targets']['met'])}; missed: {len(missed)}"]
        lines += [f"- missed {m['point']}: {m['rate']}" + (f", {100 * m['fraction_of_peak']:.1f}% of the limit" if m.get("fraction_of_peak") is not None else "")
                  + (f", {m['speedup_vs_torch']:.2f}x torch" if m.get("speedup_vs_torch") else "")
                  + (f", {m['ratio_to_lookups']:.2f}x the lookups" if m.get("ratio_to_lookups") else "") for m in missed]
    lines += ["", f"Suite points measured: {summary['suite_points']}", "", "Files: " + ", ".join(files), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gpu_summary.py RESULTS_DIR", file=sys.stderr)
        return 2
    results = argv[0]
    summary = summarize(read_lines(os.path.join(results, "results.jsonl")))
    files = sorted({*os.listdir(results), "summary.json", "summary.md"})
    summary["files"] = files
    for name, text in (("summary.json", json.dumps(summary, indent=1)), ("summary.md", markdown(summary, files))):
        tmp = os.path.join(results, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(results, name))  # a kill mid-write leaves the previous summary whole
    return 0


if __name__ == "__main__":
    sys.exit(main())
