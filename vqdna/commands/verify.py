"""`vqdna verify DIR`: recompute every checksum of a token directory (docs/token-files.md)."""

from __future__ import annotations

import argparse
import sys

HELP = "check a token directory: every shard's sizes, index structure and checksums (reads every byte)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a token directory written by `vqdna tokenize`")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every shard matches its manifest entry and index, else 1 with one line per problem."""
    from vqdna.streaming.token_files import read_manifest, verify_directory

    problems = verify_directory(args.directory)
    if problems:
        for problem in problems:
            print(f"vqdna verify: {problem}", file=sys.stderr)
        print(f"vqdna verify: {args.directory}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = read_manifest(args.directory)  # readable and complete: verify_directory checked it
    shards = len(manifest["shards"]) if manifest else 0
    if manifest and manifest.get("format_version") == 1:
        print(f"vqdna verify: {args.directory}: {shards} shards whole (format 1 records no checksums: sizes and indexes checked)")
    else:
        print(f"vqdna verify: {args.directory}: {shards} shards, every size and checksum matches")
    return 0
