"""Running one command the way ``gem3d NAME ...`` does: its parser, one-line errors, its exit code.

The CLI (``experiments/cli.py``) builds one parser over every command; the demo runs single
commands (``run_command``). Both go through ``handle``, so a command behaves the same either way,
and neither imports the other (no import cycle).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn

from gem3d.errors import Gem3dError


class Parser(argparse.ArgumentParser):
    """argparse with one line for a bad option (no usage dump): the option, the value, the valid range."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(subparsers: argparse._SubParsersAction, module: ModuleType) -> None:  # type: ignore[type-arg]
    """Add ``module`` (``NAME``, ``HELP``, ``add_arguments``, ``run``) as a subcommand."""
    sub = subparsers.add_parser(
        module.NAME, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(sub)
    sub.set_defaults(handler=module.run, command=module.NAME)


def handle(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a parsed command. A ``Gem3dError`` or ``OSError`` becomes one line on stderr and exit code 2."""
    try:
        return int(run(args) or 0)
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


def run_command(module: ModuleType, argv: list[str]) -> int:
    """``gem3d <module.NAME> argv...``, in this process; returns the exit code."""
    parser = Parser(prog="gem3d")
    add_command(parser.add_subparsers(dest="command", required=True), module)
    args = parser.parse_args([module.NAME, *argv])
    return handle(args.handler, args)
