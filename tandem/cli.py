"""`tandem` console script: one subcommand per module, each exposing register(subparsers)."""

from __future__ import annotations

import argparse
import sys

from tandem import cmd_bench, cmd_generate, cmd_models, cmd_serve, cmd_tokenizer

COMMANDS = [cmd_serve, cmd_generate, cmd_models, cmd_tokenizer, cmd_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
