"""Running a command the way ``gem3d NAME ...`` does: its parser, one-line errors, its exit code.

The CLI (``experiments/cli.py``) builds one parser over every command and runs the parsed one
through ``handle``; the demo calls the commands' typed functions (``run_train(options)``, ...)
and, for its child process, reports their errors through ``report_errors``, so an error reads
the same either way. Nothing here imports the CLI or the demo (no import cycle).
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
    return report_errors(args.command, lambda: run(args))


def report_errors(command: str, work: Callable[[], int | None]) -> int:
    """Run ``gem3d <command>``'s ``work``; returns its exit code (None: 0).

    A ``Gem3dError`` or ``OSError`` becomes one line on stderr naming the command and exit code 2,
    and so does torch's refusal of an op with no deterministic CUDA kernel; an interrupt, exit code 130.
    """
    try:
        return int(work() or 0)
    except Gem3dError as error:
        print(f"gem3d {command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder, a permission: one line naming the path
        where = f"{error.filename}: " if error.filename else ""
        print(f"gem3d {command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gem3d {command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        # On CUDA, accel.deterministic asks torch for deterministic kernels (gem3d/accel.py); an op
        # that has none stops the run with torch's message, which names it.
        if "use_deterministic_algorithms" not in str(error):  # torch's words for exactly this refusal
            raise
        first = str(error).strip().splitlines()[0]
        print(
            f"gem3d {command}: error: {first} (to run without deterministic kernels, and without "
            "same-seed-same-bytes on the GPU: --set accel.deterministic=false)",
            file=sys.stderr,
        )
        return 2
