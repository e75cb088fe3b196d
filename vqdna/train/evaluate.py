"""Held-out evaluation of a tokenizer: base reconstruction accuracy and code usage per level.

Every record of every FASTA file is cut into consecutive windows of `window` bases (the last one
shorter, padded); each window is encoded and decoded by the model in eval mode (no codebook update).
reconstruction accuracy = argmax(logits) == base over all bases (N included);
used fraction of level l = distinct codes of level l over all windows / K_l.

    python -m vqdna.train.evaluate MODEL_DIR_OR_NAME FASTA... [--window 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np
import torch

from vqdna.data import read_fasta
from vqdna.kernels.reference import BASE_PAD_ID

__all__ = ["evaluate_genomes", "main"]


def _windows(paths: Sequence[str], window: int):
    """(path, ids [window] int64 padded with 5) for every window of every record."""
    for path in paths:
        for rec in read_fasta(path):
            ids = rec.ids
            for start in range(0, len(ids), window):
                chunk = np.full(window, BASE_PAD_ID, dtype=np.int64)
                piece = ids[start : start + window]
                chunk[: len(piece)] = piece
                yield path, chunk


@torch.no_grad()
def evaluate_genomes(model, paths: Sequence[str], window: int = 256, batch_size: int = 64, device=None) -> dict:
    """{"per_file": {path: {...}}, "all": {...}} with bases, recon_acc, used_fraction [per level],
    codes_used [per level] for each file and over all files together."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    sizes = list(model.config.codebook_sizes)

    def fresh():
        return {"bases": 0, "correct": 0, "seen": [torch.zeros(k, dtype=torch.bool) for k in sizes]}

    stats = {p: fresh() for p in paths}
    total = fresh()
    batch, owners = [], []

    def flush():
        ids = torch.from_numpy(np.stack(batch)).to(device)
        out = model(ids)
        keep = ids < BASE_PAD_ID
        correct = ((out.logits.argmax(-1) == ids) & keep).sum(1).cpu()
        n = keep.sum(1).cpu()
        codes = out.codes.cpu()
        for row, owner in enumerate(owners):
            for s in (stats[owner], total):
                s["bases"] += int(n[row])
                s["correct"] += int(correct[row])
                for level in range(len(sizes)):
                    c = codes[row, :, level]
                    s["seen"][level][c[c >= 0]] = True
        batch.clear()
        owners.clear()

    for path, chunk in _windows(paths, window):
        batch.append(chunk)
        owners.append(path)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)

    def summary(s):
        return {
            "bases": s["bases"],
            "recon_acc": s["correct"] / max(1, s["bases"]),
            "codes_used": [int(x.sum()) for x in s["seen"]],
            "used_fraction": [float(x.float().mean()) for x in s["seen"]],
            "codebook_sizes": sizes,
        }

    return {"per_file": {p: summary(s) for p, s in stats.items()}, "all": summary(total), "window": window}


def format_report(report: dict) -> str:
    lines = [f"{'file':<48} {'bases':>11} {'recon acc':>10}  codes used per level"]
    rows = list(report["per_file"].items()) + [("all held-out", report["all"])]
    for name, s in rows:
        used = "  ".join(f"{u}/{k} ({100 * f:.1f}%)" for u, k, f in zip(s["codes_used"], s["codebook_sizes"], s["used_fraction"]))
        lines.append(f"{name[-48:]:<48} {s['bases']:>11,} {100 * s['recon_acc']:>9.3f}%  {used}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqdna.train.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="tokenizer directory or bundled name (e.g. vqdna-small)")
    parser.add_argument("fasta", nargs="+")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="write the report as JSON here")
    args = parser.parse_args(argv)
    from vqdna.models.tokenizer_model import VQDNATokenizerModel

    model = VQDNATokenizerModel.from_pretrained(args.model)
    t0 = time.perf_counter()
    report = evaluate_genomes(model, args.fasta, window=args.window, batch_size=args.batch_size)
    report["seconds"] = time.perf_counter() - t0
    report["tokenizer_sha256"] = model.tokenizer_sha256
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
