"""`vqdna gpu-check`: compile every GPU kernel ahead of time, without a GPU, and check its resources."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "compile every Triton and CUDA kernel for sm_80/sm_90 without a GPU; fail on errors, spills, over-limit shared memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help="architectures, comma-separated (default: sm_80,sm_90)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--backend", nargs="+", choices=["triton", "cuda"], default=["triton", "cuda"])
    parser.add_argument("--op", nargs="+", help="only these ops (lookup, quantize, hrq_quantize, ema_stats, stem)")
    parser.add_argument(
        "--subset", action="store_true",
        help="the representative subset (the first and last variant of each kernel and dtype) instead of every variant",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: the CPU count)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again (results are cached otherwise)")
    parser.add_argument("--quiet", action="store_true", help="print only the failures and the summary")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces @triton.jit functions at import: compiling needs the real ones.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "vqdna.cli", *sys.argv[1:]], env)

    import json

    from vqdna.kernels import gpu_check

    archs = gpu_check.parse_arch(args.arch)
    unknown = [a for a in archs if a not in gpu_check.SHARED_LIMIT_BYTES]
    if unknown:
        print(f"vqdna gpu-check: no shared-memory limit known for sm_{unknown[0]}", file=sys.stderr)
        return 2
    report = gpu_check.run_check(
        archs=archs, full=not args.subset, backends=args.backend, jobs=args.jobs, use_cache=not args.no_cache, ops=args.op
    )
    rows = report["kernels"]
    failed = [r for r in rows if r["problems"]]
    print(gpu_check.format_table(failed if args.quiet else rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    compiled = sum(1 for r in rows if not r.get("pruned"))
    pruned = sum(1 for r in rows if r.get("pruned"))
    cached = sum(1 for r in rows if r.get("cached"))
    print(
        f"vqdna gpu-check: triton {report['triton'] or '-'}, nvcc {report['nvcc'] or '-'}, {', '.join(report['archs'])}: "
        f"{compiled} kernels checked ({cached} from the cache), {pruned} configs pruned, {len(failed)} failed"
    )
    return 1 if failed else 0
