"""Subcommands of the `vqdna` command, one module each: `HELP`, `add_arguments(parser)`, `run(args) -> int`."""
