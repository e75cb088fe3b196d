"""The `vqdna` command: one subcommand per module of vqdna.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module under vqdna.commands. Modules are imported only to build the parser
# (each keeps its heavy imports inside run()).
COMMANDS = {
    "demo": "demo",
    "train-tokenizer": "train_tokenizer",
    "tokenize": "tokenize",
    "verify": "verify",
    "bench": "bench",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "gpu-check": "gpu_check",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqdna", description="Fast learned genome vocabularies (VQDNA).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"vqdna.commands.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
