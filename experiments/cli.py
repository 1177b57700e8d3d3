"""The ``gem3d`` command: one thin subcommand per module in ``experiments/commands``."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from experiments.commands import (
    audit,
    counterfactual,
    deenhance,
    demo,
    demo_data,
    enhance,
    evaluate,
    prepare,
    release,
    sample,
    train,
)
from experiments.commands.runner import Parser, add_command, handle

COMMANDS: list[ModuleType] = [
    demo,
    demo_data,
    prepare,
    train,
    sample,
    enhance,
    counterfactual,
    deenhance,
    audit,
    release,
    evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gem3d", description="Federated, privacy-preserving synthesis of 3D medical images (GEM-3D).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        add_command(subparsers, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A ``Gem3dError`` or ``OSError`` becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    return handle(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
