"""`vqdna tokenize`: FASTA files -> token files (docs/token-files.md), resumable, on CPU or GPU(s)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "tokenize FASTA files into token files with a trained tokenizer (CPU, GPU, or torchrun ranks)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a 0 or negative count is an error, never a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FASTA files (plain, .gz or .xz)")
    parser.add_argument("--out", required=True, help="output directory (created; see docs/token-files.md)")
    parser.add_argument("--model", default="vqdna-small", help="bundled tokenizer name or a directory (default: vqdna-small)")
    from vqdna.streaming.settings import DEFAULT_SHARD_BASES, DEFAULT_WINDOW

    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, help="bases per window; a halo of the receptive radius is added each side")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="windows per batch (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="inference precision (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--shard-bases", type=positive_int, default=DEFAULT_SHARD_BASES, help="bases per shard (= per work unit; a plain FASTA file is cut into ranges of this many bytes, fewer for short records)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run, re-checking the shards it wrote and re-doing damaged ones")
    parser.add_argument("--verify", action="store_true", help="with --resume: also recompute the checksums of the shards written before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(message: str) -> int:
    print(f"vqdna tokenize: error: {message}", file=sys.stderr)
    return 1


def os_error_message(exc: OSError, where: str) -> str:
    """'FILE: reason' for an OSError; `where` (the output directory) when the error names no file."""
    return f"{exc.filename if exc.filename is not None else where}: {exc.strerror or exc}"


def format_summary(stats, seconds_label: str = "") -> str:
    """The end-of-run summary: records, bases, speed, time split, code usage per level."""
    import numpy as np

    rate = stats.bases / stats.seconds if stats.seconds > 0 else 0.0
    lines = [
        f"records  {stats.total_records:,} in the output ({stats.records:,} tokenized by this run)",
        f"bases    {stats.total_bases:,} in the output ({stats.bases:,} by this run)",
        f"speed    {rate / 1e6:.3f} M bases/s over {stats.seconds:.2f} s wall{seconds_label}",
        f"stages   reading {stats.read_s:.2f} s, compute {stats.compute_s:.2f} s, writing {stats.write_s:.2f} s (busy time; they overlap)",
        f"shards   {stats.shards_written} written, {stats.shards_skipped} already complete",
    ]
    lines += [f"re-done  {problem}" for problem in stats.redone]
    for level, counts in enumerate(stats.usage):
        total = counts.sum()
        if total == 0:
            lines.append(f"level {level}  {len(counts)} codes, none emitted by this run")
            continue
        p = counts[counts > 0] / total
        perplexity = float(np.exp(-(p * np.log(p)).sum()))
        lines.append(
            f"level {level}  {int((counts > 0).sum())}/{len(counts)} codes used ({100.0 * (counts > 0).mean():.1f}%), perplexity {perplexity:.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vqdna.data.fasta import FastaFormatError
    from vqdna.streaming import TokenizeError, tokenize_files
    from vqdna.streaming.token_files import TokenFileError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    try:
        import torch

        if distributed:
            import torch.distributed as dist

            cuda = args.device != "cpu" and torch.cuda.is_available()
            if cuda:  # NCCL's object collectives use the current device: one GPU per rank
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
            rank = dist.get_rank()
        from vqdna.models import VQDNATokenizerModel

        try:
            model = VQDNATokenizerModel.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            return _error(f"cannot load the tokenizer {args.model!r}: {exc}")
        stats = tokenize_files(
            args.inputs,
            args.out,
            model,
            window=args.window,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            shard_bases=args.shard_bases,
            resume=args.resume,
            verify=args.verify,
            progress=not args.no_progress,
        )
        if distributed:  # success only: a rank that failed must not wait here for the others
            dist.barrier()  # no rank tears the process group down while another still talks to it
    except (FastaFormatError, TokenFileError, TokenizeError) as exc:
        return _error(str(exc))
    except OSError as exc:  # disk full, permissions, a vanished input
        return _error(os_error_message(exc, args.out))
    except KeyboardInterrupt:  # the lock is released and complete shards kept: --resume continues
        if rank == 0:
            print(f"vqdna tokenize: interrupted; {args.out} can be continued with the same command and --resume", file=sys.stderr)
        return 130
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0:
        print(f"vqdna tokenize: {args.out} complete ({os.path.abspath(args.out)})")
        print(format_summary(stats))
    return 0
