"""The ``gem3d`` command: one thin subcommand per module in ``experiments/commands``."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import NoReturn

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
from gem3d.errors import Gem3dError

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


class Parser(argparse.ArgumentParser):
    """argparse with one line for a bad option (no usage dump): the option, the value, the valid range."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gem3d", description="Federated, privacy-preserving synthesis of 3D medical images (GEM-3D)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        sub = subparsers.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A ``Gem3dError`` or ``OSError`` becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except Gem3dError as error:
        print(f"gem3d {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder, a permission: one line naming the path
        where = f"{error.filename}: " if error.filename else ""
        print(f"gem3d {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gem3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
