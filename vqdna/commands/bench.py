"""`vqdna bench`: every op x backend x dtype against the reference, the peers and the device limit."""

from __future__ import annotations

import argparse
import sys

HELP = "benchmark the ops against the reference, the peers and the measured device limits"

_OPS = ("lookup", "hrq_quantize", "ema_update", "kmeans", "stem", "convnext_block", "quantize", "VectorQuantizer", "VectorQuantizer-options", "tokenizer-encode", "encode-rate", "tokenize-rate")  # = vqdna.bench.OPS (kept light here; tests check they agree)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", nargs="+", choices=[*_OPS, "all"], default=["all"], help="ops to run (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--size", choices=["tiny", "small", "full"], default="small",
        help="tiny: seconds; small: a few CPU minutes; full: N up to 2^24, K up to 65536 (a GPU; on the CPU "
        "cases above a work budget are left out)",
    )
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], help="default: per device")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per implementation (best is kept)")
    parser.add_argument("--json", metavar="FILE", help="write the results (with provenance) as JSON, and a .md beside it")
    parser.add_argument("--plot", metavar="FILE", help="draw throughput against N and K as a PNG")
    parser.add_argument(
        "--write-table", nargs="?", const="", default=None, metavar="FILE",
        help="write the measured winners into the backend table backend='auto' follows "
        "(default: the packaged vqdna/kernels/backend_table.json)",
    )
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE",
        help="use the results of earlier runs (their JSON files) instead of running: print, plot, write the table",
    )
    parser.add_argument("--note", help="a note stored with the results (e.g. the machine's load)")
    parser.add_argument(
        "--case", nargs="+", metavar="TEXT",
        help="run only the cases whose id contains one of these texts (e.g. cosine-eval stochastic-train)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from vqdna.bench import cases as cases_mod
    from vqdna.bench.measure import add_ratios, format_table, provenance, write_results
    from vqdna.bench.runner import run_cases
    from vqdna.kernels import dispatch

    command = "vqdna bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "vqdna bench"
    if args.from_json:
        rows, prov = [], None
        for path in args.from_json:
            with open(path) as f:
                data = json.load(f)
            if "results" not in data:
                print(f"vqdna bench: {path}: no 'results' list (not a vqdna benchmark file)", file=sys.stderr)
                return 2
            rows.extend(data["results"])
            prov = prov or {k: v for k, v in data.items() if k not in ("results", "note")}
        device_type = prov.get("device_type") or rows[0]["device"]
        device_name = prov.get("device_name")
        if args.write_table is not None and not device_name:
            print(f"vqdna bench: {args.from_json[0]}: no device_name in its provenance; cannot key a table entry", file=sys.stderr)
            return 2
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("vqdna bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        ops = None if "all" in args.op else args.op
        dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
        device = args.device
        # Tiny runs measure the limits on smaller problems too (a 1024^2 matmul, a 2^20 copy).
        peak_size = 1024 if args.size == "tiny" else None
        cases_mod.left_out.clear()
        print(f"vqdna bench: device {device} ({dispatch.device_name(device)}), size {args.size}", file=sys.stderr)
        selected = cases_mod.cases(ops, device, args.size, dtypes)
        if args.case:
            selected = (c for c in selected if any(text in c.id for text in args.case))
        rows = run_cases(
            selected, rounds=args.rounds, peak_size=peak_size,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        for why in cases_mod.left_out:
            print(f"left out: {why}", file=sys.stderr)
        if not rows:
            print("vqdna bench: nothing ran", file=sys.stderr)
            return 1
        prov = provenance(device, command)
        prov["device_name"] = dispatch.device_name(device)
        prov["size"] = args.size
        prov["left_out"] = list(cases_mod.left_out)
        device_type, device_name = torch.device(device).type, prov["device_name"]

    add_ratios(rows)
    print("\n".join(format_table(rows)))
    if args.json and not args.from_json:
        json_path, md_path = write_results(args.json, rows, prov, note=args.note)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    if args.plot:
        from vqdna.bench.plot import plot_results

        plot_results(rows, args.plot, title=f"vqdna bench: {prov.get('device')} ({prov.get('date')})")
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.write_table is not None:
        from vqdna.bench.table import update_table

        source = {k: prov.get(k) for k in ("device", "torch", "triton", "commit", "command", "date")}
        path, _ = update_table(rows, device_type, device_name, source, path=args.write_table or None)
        dispatch.set_backend_table(None)  # this process follows the new table from now on
        print(f"wrote the backend table {path}", file=sys.stderr)
    return 0
