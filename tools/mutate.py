"""Mutation testing: plant each small bug of tests/mutations.toml in a scratch copy of the tree, run the
tests that must catch it, and report the kill rate and the survivors.

    python tools/mutate.py                 # every mutation (make mutate)
    python tools/mutate.py --only ID ...   # some of them
    python tools/mutate.py --list          # the set, with the equivalent ones and why

Each mutation: `file`, a `find` snippet that must occur exactly once in it, its `replace`ment, and
`tests` (pytest arguments, run with TRITON_INTERPRET=1 in the scratch tree) that must fail on the
mutant. `equivalent = "why"` marks one that no test can tell apart (listed, not run, not counted).
A snippet that is missing or not unique is an error for that mutation, never a pass: after a merge
moves code, update the snippet.

The scratch tree (default build/mutate/tree) is kept between runs: files are copied in only when
they changed, so the C++ extension there rebuilds incrementally (`setup.py build_ext --inplace`).
A C++ mutation recompiles the files that include the mutated one; afterwards the source (with its
mtime) and the unmutated objects and extension are put back, so nothing is compiled to undo it. Before any mutation, the selections must pass on the
unmutated tree (the baseline), so that a failure means the mutant was caught.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SET = os.path.join(ROOT, "tests", "mutations.toml")
DEFAULT_SCRATCH = os.path.join(ROOT, "build", "mutate", "tree")
CPP_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
# pytest exit codes: 0 all passed, 1 some failed, 2 interrupted (e.g. a collection error), 5 no tests
_KILLED_CODES = (1, 2)


@dataclass
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: list[str]
    equivalent: Optional[str] = None
    note: str = ""
    status: str = "pending"  # killed | survived | error | equivalent
    detail: str = ""
    seconds: float = 0.0
    output: str = field(default="", repr=False)

    @property
    def cpp(self) -> bool:
        return self.file.endswith(CPP_SUFFIXES)


def load(path: str) -> list[Mutation]:
    """The mutation set; ValueError naming the file and entry for a malformed one."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    mutations, seen = [], set()
    for i, entry in enumerate(data.get("mutation", [])):
        where = f"{path}: mutation {i + 1} ({entry.get('id', 'no id')})"
        missing = [k for k in ("id", "file", "find", "replace", "tests") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        unknown = set(entry) - {"id", "file", "find", "replace", "tests", "equivalent", "note"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if entry["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        if not isinstance(entry["tests"], list) or not entry["tests"]:
            raise ValueError(f"{where}: tests must be a non-empty list of pytest arguments")
        if entry["find"] == entry["replace"]:
            raise ValueError(f"{where}: find and replace are the same")
        seen.add(entry["id"])
        mutations.append(Mutation(**entry))
    return mutations


def tree_files(root: str) -> list[str]:
    """The repository's files (tracked, and untracked ones git does not ignore), relative to root."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]


def sync(src: str, dst: str) -> int:
    """Copy src's repository files into dst where their bytes differ (mtimes of unchanged files stay,
    so the incremental C++ build only redoes what changed). Returns the number of files copied."""
    copied = 0
    for rel in tree_files(src):
        a, b = os.path.join(src, rel), os.path.join(dst, rel)
        with open(a, "rb") as f:
            data = f.read()
        if os.path.exists(b):
            with open(b, "rb") as f:
                if f.read() == data:
                    continue
        os.makedirs(os.path.dirname(b), exist_ok=True)
        shutil.copy2(a, b)
        os.utime(b)  # newer than any object built from the old content
        copied += 1
    return copied


def build(tree: str, log) -> None:
    """Build (incrementally) the C++ extension in place in `tree`; RuntimeError with the log tail on failure."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                          capture_output=True, text=True)
    if done.returncode != 0 or not glob.glob(os.path.join(tree, "vqdna", "_C*.so")):
        raise RuntimeError(f"building the extension in {tree} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    log(f"  built the extension in {time.perf_counter() - t:.0f} s")


_PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]


def run_tests(tree: str, args: list[str], timeout: float, driver: bool = False) -> tuple[int, str]:
    """pytest `args` in `tree` (TRITON_INTERPRET=1, the tree first on the path, stop at the first
    failure), or with driver=True this script's --baseline mode there."""
    # No bytecode: a restored file must never meet a .pyc of its mutant (same size, same second).
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VQDNA_BACKEND", None)
    if driver:
        cmd = [sys.executable, os.path.abspath(__file__), *args]
    else:
        cmd = [sys.executable, "-m", "pytest", *_PYTEST_ARGS, *args]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out
    return done.returncode, done.stdout + done.stderr


def _built(tree: str) -> list[str]:
    """The unmutated build outputs of tree, relative: object files and the extension (in place and in build/lib)."""
    pats = ["build/temp*/**/*.o", "build/lib*/vqdna/_C*.so", "vqdna/_C*.so"]
    return sorted(os.path.relpath(p, tree) for pat in pats for p in glob.glob(os.path.join(tree, pat), recursive=True))


def snapshot(tree: str, store: str) -> None:
    """Keep a copy (with mtimes) of tree's unmutated build outputs in store."""
    shutil.rmtree(store, ignore_errors=True)
    for rel in _built(tree):
        os.makedirs(os.path.dirname(os.path.join(store, rel)), exist_ok=True)
        shutil.copy2(os.path.join(tree, rel), os.path.join(store, rel))


def unbuild(tree: str, store: str) -> None:
    """Put the unmutated build outputs back, old mtimes and all: with the reverted source's mtime also
    restored, ninja and setuptools see nothing to redo, so a C++ mutation costs one compile, not two."""
    for dirpath, _, names in os.walk(store):
        for name in names:
            src = os.path.join(dirpath, name)
            shutil.copy2(src, os.path.join(tree, os.path.relpath(src, store)))


def apply(tree: str, m: Mutation) -> Optional[tuple[str, float]]:
    """Plant m in tree; returns the original text and mtime, or None (m.status = error) when it cannot."""
    path = os.path.join(tree, m.file)
    if not os.path.exists(path):
        m.status, m.detail = "error", f"file not found: {m.file}"
        return None
    mtime = os.stat(path).st_mtime
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(m.find)
    if count != 1:
        m.status = "error"
        m.detail = f"snippet not found in {m.file}" if count == 0 else f"snippet found {count} times in {m.file} (must be unique)"
        return None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(m.find, m.replace))
    return text, mtime


def restore(tree: str, m: Mutation, original: tuple[str, float]) -> None:
    path = os.path.join(tree, m.file)
    with open(path, "w", encoding="utf-8") as f:
        f.write(original[0])
    os.utime(path, (original[1], original[1]))


def baseline(selections: list[list[str]]) -> int:
    """Run every selection as its own pytest session in this one process; 0 when all pass."""
    import pytest

    failed = 0
    for sel in selections:
        t = time.perf_counter()
        code = pytest.main([*_PYTEST_ARGS, *sel])
        print(f"baseline: exit {int(code)} in {time.perf_counter() - t:.0f} s for {' '.join(sel)}", flush=True)
        failed += code != 0
    return 1 if failed else 0


def tree_digest(root: str, selections) -> str:
    """sha256 of the repository files under root and of the selections: the baseline's identity."""
    h = hashlib.sha256(json.dumps(selections).encode())
    for rel in sorted(tree_files(root)):
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline"]:
        return baseline(json.loads(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=DEFAULT_SET, help="the mutation set (TOML)")
    ap.add_argument("--scratch", default=DEFAULT_SCRATCH, help="scratch copy of the tree (kept between runs)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true",
                    help="only check that every snippet occurs exactly once in this tree (e.g. after a merge)")
    ap.add_argument("--threshold", type=float, default=0.9, help="fail below this kill rate (default 0.9)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run; a timeout counts as killed")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selections on the unmutated tree")
    ap.add_argument("--report", help="write the results as JSON here (default: next to the scratch tree)")
    args = ap.parse_args(argv)

    mutations = load(args.set)
    if args.only:
        unknown = set(args.only) - {m.id for m in mutations}
        if unknown:
            ap.error(f"unknown mutation ids: {sorted(unknown)}")
        mutations = [m for m in mutations if m.id in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.id:32s} {m.file:38s} {'EQUIVALENT: ' + m.equivalent if m.equivalent else ' '.join(m.tests)}")
        return 0

    if args.check:
        bad = 0
        for m in mutations:
            path = os.path.join(ROOT, m.file)
            count = open(path, encoding="utf-8").read().count(m.find) if os.path.exists(path) else -1
            if count != 1:
                bad += 1
                print(f"{m.id}: " + (f"file not found: {m.file}" if count < 0 else f"snippet found {count} times in {m.file}"))
        print(f"{len(mutations) - bad} of {len(mutations)} snippets found exactly once")
        return 1 if bad else 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    tree = os.path.abspath(args.scratch)
    os.makedirs(tree, exist_ok=True)
    for cache in glob.glob(os.path.join(tree, "**", "__pycache__"), recursive=True):
        shutil.rmtree(cache)
    log(f"mutate: {len(mutations)} mutations from {os.path.relpath(args.set, ROOT)}, scratch tree {tree}")
    log(f"  synced the tree ({sync(ROOT, tree)} files copied)")
    store = os.path.join(os.path.dirname(tree), "unmutated-build")
    if os.path.isdir(store):
        unbuild(tree, store)  # a run stopped mid-mutation may have left a mutant extension behind
    build(tree, log)
    snapshot(tree, store)

    live = [m for m in mutations if not m.equivalent]
    for m in mutations:
        if m.equivalent:
            m.status, m.detail = "equivalent", m.equivalent
    if not args.no_baseline:
        # Every distinct selection must pass unmutated, or a "kill" would mean nothing. One process
        # runs them all (torch is imported once); each is a separate pytest session. A baseline that
        # passed on the same files and selections is not run again.
        selections = list(dict.fromkeys(tuple(m.tests) for m in live))
        stamp, digest = os.path.join(os.path.dirname(tree), "baseline.ok"), tree_digest(ROOT, selections)
        if os.path.exists(stamp) and open(stamp).read() == digest:
            log("  baseline: passed before on these files and selections")
        else:
            t = time.perf_counter()
            code, out = run_tests(tree, ["--baseline", json.dumps(selections)], args.timeout * 4, driver=True)
            log(f"  baseline: {len(selections)} selections in {time.perf_counter() - t:.0f} s")
            if code != 0:
                log(f"BASELINE FAILS: a selection does not pass on the unmutated tree\n{out[-4000:]}")
                return 2
            with open(stamp, "w") as f:
                f.write(digest)

    # Python mutations first; then C++ ones grouped by file (a rebuild recompiles the reverted file
    # together with the next mutated one).
    order = sorted(live, key=lambda m: (m.cpp, m.file if m.cpp else ""))
    for i, m in enumerate(order):
        t = time.perf_counter()
        original = apply(tree, m)
        if original is not None:
            try:
                if m.cpp:
                    build(tree, log)
                code, m.output = run_tests(tree, m.tests, args.timeout)
                if code == -1:
                    m.status, m.detail = "killed", f"timeout after {args.timeout:.0f} s"
                elif code in _KILLED_CODES:
                    m.status = "killed"
                    failed = [ln for ln in m.output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
                    m.detail = failed[0] if failed else f"pytest exit {code}"
                elif code == 0:
                    m.status, m.detail = "survived", "every selected test passed"
                else:
                    m.status, m.detail = "error", f"pytest exit {code}: {m.output.strip().splitlines()[-1:]}"
            except RuntimeError as exc:  # a mutant that does not compile is caught by the compiler
                m.status, m.detail = "killed", "does not compile: " + str(exc).splitlines()[0]
            finally:
                restore(tree, m, original)
                if m.cpp:
                    unbuild(tree, store)
        m.seconds = time.perf_counter() - t
        log(f"[{i + 1:2d}/{len(order)}] {m.status.upper():8s} {m.id:32s} {m.seconds:5.0f} s  {m.detail[:110]}")

    killed = [m for m in live if m.status == "killed"]
    survivors = [m for m in live if m.status == "survived"]
    errors = [m for m in live if m.status == "error"]
    rate = len(killed) / len(live) if live else 1.0
    total = time.perf_counter() - t0
    log("")
    log(f"kill rate {len(killed)}/{len(live)} = {100 * rate:.1f}% of the non-equivalent mutations "
        f"({len(mutations) - len(live)} equivalent, not run) in {total / 60:.1f} min")
    for m in survivors:
        log(f"  SURVIVED {m.id}: {m.file}: {m.find!r} -> {m.replace!r}  ({' '.join(m.tests)})")
    for m in errors:
        log(f"  ERROR    {m.id}: {m.detail}")
    report = args.report or os.path.join(os.path.dirname(tree), "report.json")
    with open(report, "w") as f:
        json.dump({"kill_rate": rate, "killed": len(killed), "non_equivalent": len(live), "seconds": round(total),
                   "mutations": [{k: v for k, v in vars(m).items() if k != "output"} for m in mutations]}, f, indent=1)
    log(f"report: {report}")
    if errors:
        return 1
    return 0 if rate >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
