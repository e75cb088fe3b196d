"""The `vqdna` command: one subcommand per module of vqdna.commands."""

from __future__ import annotations

import argparse
import importlib
import os
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


def passive_openmp(argv: list[str] | None = None) -> None:
    """Make OpenMP threads sleep, not spin, while they wait (OMP_WAIT_POLICY=PASSIVE) unless the user chose
    a policy. On a loaded 2-core machine spinning threads slowed pre-training about tenfold (issue 18).
    OpenMP reads the variable once, when torch loads it, and `import vqdna` (which runs before this
    module) imports torch: so when called as the program (argv None) the process re-executes itself
    with the variable set. Called with an argv list (tests, embedding programs) it only sets the
    variable, for any child processes."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if argv is None and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        # the original command line, interpreter options included (`python -m vqdna.cli ...`, the `vqdna` script)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def main(argv: list[str] | None = None) -> int:
    passive_openmp(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
