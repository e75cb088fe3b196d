"""Corpus-scale benchmark of `vqdna tokenize` (issue 22): N random records of L bases, generated on the
fly into one FASTA file, tokenized on the CPU, then read back with TokenDataset.

    python -m bench.scale --records 1000000 --length 8                  # the bundled vqdna-small
    python -m bench.scale --records 20000000 --length 8 --model null    # everything but the encoder

Reports wall time, bases/s, records/s, the bases the encoder coded (short records repeated in a work
unit are coded once: random 8-bp records hold at most 4^8 distinct ones) and peak RSS of the tokenization (one process: ru_maxrss, the
input is generated in bounded chunks first), the encoder's share of the wall time (the compute
stage's busy time over the wall), the time rank 0 takes to plan the run under torchrun (plan_units),
TokenDataset's open time, first find() time and random-access time, and the peak RSS once those
reads are done too. `--model null` replaces the encoder by a stand-in whose codes are a cheap function
of the ids (same shapes, dtypes and code range): it measures the pipeline's own cost per record
(reading, work units, packing, writing, indexes), which the encoder's cost hides on a CPU.
Peak RSS is valid on a loaded machine; rates are not (run on an idle one).

    python -m bench.scale --records 20000000 --length 8 --plan-only [--world 8]

only generates the input and measures the torchrun planning: rank 0's plan_units (seconds, bytes read)
and what one rank then reads to build its units (rank 1 of --world: seconds, bytes read), the bytes
counted by the kernel (/proc/self/io rchar: every read system call, page cache or not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

_CHUNK = 100_000  # records generated per write


class NullTokenizer(torch.nn.Module):
    """A stand-in for VQDNATokenizerModel with two levels (64, 256 codes) and receptive radius 14
    (vqdna-small's): codes are functions of the ids, computed in one vectorised pass."""

    receptive_radius = 14
    tokenizer_sha256 = "0" * 64

    class config:  # noqa: N801 (mimics a transformers config)
        codebook_sizes = (64, 256)

        @staticmethod
        def to_json_string(use_diff: bool = False) -> str:
            return json.dumps({"codebook_sizes": [64, 256]})

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids int [B, L] -> int32 codes [B, L, 2]."""
        x = ids.to(torch.int32)
        return torch.stack((x * 7 % 64, x * 31 % 256), dim=-1)


def write_records(path: str, records: int, length: int, seed: int = 0) -> int:
    """Write `records` random ACGT records of `length` bases (names r0, r1, ...) to `path`; returns
    the file's size. Memory: one chunk of _CHUNK records."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", np.uint8)
    with open(path, "wb") as f:
        for first in range(0, records, _CHUNK):
            n = min(_CHUNK, records - first)
            seqs = letters[rng.integers(0, 4, (n, length), dtype=np.uint8)]
            lines = np.full((n, length + 1), ord("\n"), dtype=np.uint8)
            lines[:, :length] = seqs
            body = lines.tobytes()
            f.write(b"".join(b">r%d\n%s" % (first + i, body[i * (length + 1) : (i + 1) * (length + 1)]) for i in range(n)))
    return os.path.getsize(path)


def _model(name: str):
    if name == "null":
        return NullTokenizer()
    from vqdna.models import VQDNATokenizerModel

    return VQDNATokenizerModel.from_pretrained(name)


def _read_bytes() -> int:
    """Bytes this process has read by read() system calls so far (/proc/self/io rchar; -1 without /proc)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return -1


def plan(fasta: str, world: int = 8) -> dict:
    """Rank 0's plan of a torchrun run over `fasta` at the default limits, and rank 1's reading of its
    units (every world-th from 1, halo 14): seconds and bytes read (rchar) of each."""
    from vqdna.streaming.settings import DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS
    from vqdna.streaming.units import plan_units, planned_units

    limits = (DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS)
    before, t0 = _read_bytes(), time.perf_counter()
    units = plan_units([fasta], *limits)
    plan_s, plan_bytes = time.perf_counter() - t0, _read_bytes() - before
    before, t0 = _read_bytes(), time.perf_counter()
    records = sum(len(u.pieces) for u in planned_units([fasta], units, range(1, len(units), world), *limits, margin=14))
    return {
        "input_bytes": os.path.getsize(fasta),
        "units": len(units),
        "plan_s": round(plan_s, 4),
        "plan_read_bytes": plan_bytes,
        "world": world,
        "rank1_units_s": round(time.perf_counter() - t0, 3),
        "rank1_read_bytes": _read_bytes() - before,
        "rank1_pieces": records,
        "load_average": os.getloadavg()[0],
    }


def run(records: int, length: int, model: str = "vqdna-small", workdir: str | None = None, keep: bool = False) -> dict:
    """Generate, tokenize, read back; returns the measurements (see the module docstring)."""
    from vqdna.data import TokenDataset
    from vqdna.streaming import tokenize_files
    from vqdna.streaming.settings import DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS
    from vqdna.streaming.units import plan_units

    work = tempfile.mkdtemp(prefix="vqdna-scale-", dir=workdir)
    try:
        fasta = os.path.join(work, "in.fa")
        t0 = time.perf_counter()
        size = write_records(fasta, records, length)
        generate_s = time.perf_counter() - t0
        encoder = _model(model)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = os.path.join(work, "tokens")
        t0 = time.perf_counter()
        stats = tokenize_files([fasta], out, encoder, device="cpu")
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        t0 = time.perf_counter()
        plan_units([fasta], DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = TokenDataset(out)
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = ds.find(f"r{records - 1}") if records else None
        find_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        picks = rng.integers(0, max(records, 1), 1000) if records else []
        t0 = time.perf_counter()
        for i in picks:
            ds[int(i)]
        access_s = (time.perf_counter() - t0) / max(len(picks), 1)
        peak_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the reading included
        assert found == records - 1 or not records
        return {
            "records": records,
            "length": length,
            "model": model,
            "input_bytes": size,
            "generate_s": round(generate_s, 3),
            "wall_s": round(wall, 3),
            "bases_per_s": round(stats.bases / wall, 1),
            "records_per_s": round(stats.records / wall, 1),
            "encoder_share": round(stats.compute_s / wall, 3),
            "encoded_bases": stats.encoded_bases,  # fewer than records x length when short records repeat
            "copied_records": stats.copied_records,
            "plan_s": round(plan_s, 3),
            "peak_rss_gb": round(peak * 1024 / 1e9, 3),
            "rss_before_tokenize_gb": round(rss_before * 1024 / 1e9, 3),
            "peak_rss_with_reading_gb": round(peak_all * 1024 / 1e9, 3),
            "shards": len(ds.manifest["shards"]),
            "open_s": round(open_s, 4),
            "first_find_s": round(find_s, 5),
            "random_access_s": round(access_s, 7),
            "load_average": os.getloadavg()[0],
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="N records (default 1,000,000)")
    parser.add_argument("--length", type=int, default=8, help="L bases per record (default 8)")
    parser.add_argument("--model", default="vqdna-small", help="a bundled tokenizer, a directory, or 'null' (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="where the input and token files go (default: the temp dir)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--plan-only", action="store_true", help="measure the torchrun planning only (see above)")
    parser.add_argument("--world", type=int, default=8, help="ranks assumed by --plan-only (default 8)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan_only:
        work = tempfile.mkdtemp(prefix="vqdna-scale-", dir=args.workdir)
        try:
            fasta = os.path.join(work, "in.fa")
            write_records(fasta, args.records, args.length)
            result = plan(fasta, args.world)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        result = run(args.records, args.length, args.model, args.workdir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
