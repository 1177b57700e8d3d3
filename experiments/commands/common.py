"""Options, arguments, config loading and MLflow runs shared by several subcommands.

A command's options are a frozen dataclass (``CommandOptions``: one field per argparse
destination, the option's default as the field's) and a typed function does its work from them
(``run_train(options)``, ...); its ``run(args)`` only builds the options from the parsed command
line, so the CLI and a caller such as the demo (``experiments/demo.py``) run the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from experiments.configs import parse_overrides, resolve_config_path
from experiments.tracking import Tracker
from gem3d.config import Config, flatten_config, load_config
from gem3d.errors import ConfigError

# argparse fields that are the dispatcher's, not the command's: its handler and the command's name
_DISPATCH = ("handler", "command")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandOptions:
    """A command's options: one typed field per argparse destination (``--per-case`` is ``per_case``).

    A field's default is the option's default; ``add_arguments`` reads it from here. Repeatable
    options are tuples. A command's ``run(args)`` is ``run_<name>(<Name>Options.from_args(args))``.
    """

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The options of a parsed command line (every destination is a field: a stray one is a TypeError)."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k not in _DISPATCH}
        return cls(**values)

    def params(self) -> dict[str, Any]:
        """The options as MLflow params, ``args.<field>``; not ``track``: where a run is logged says nothing of it."""
        names = sorted(f.name for f in dataclasses.fields(self))
        return {f"args.{name}": getattr(self, name) for name in names if name != "track"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigOptions(CommandOptions):
    """``--config`` and ``--set`` (``add_config_argument``): the config and its field overrides."""

    config: str = "tiny"
    set: tuple[str, ...] = ()
    """``SECTION.FIELD=VALUE`` items, each as one ``--set`` (VALUE is parsed as TOML)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackedOptions(CommandOptions):
    """A command that writes ``out`` and logs its run in MLflow: ``--track DIR|off`` (None: its default store)."""

    out: Path
    track: str | None = None


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def device_name(text: str) -> str:
    """argparse type: a device name, not empty (an empty one would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: expected cpu, cuda or cuda:N")
    return text.strip()


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: expected a number > 0")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a number strictly between 0 and 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 0")
    return value


SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's generators take any seed up to here


def seed_int(text: str) -> int:
    """argparse type: a seed within 0..2**63-1."""
    value = int(_number(text, int))
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value}: expected a seed within 0..2**63-1")
    return value


GRID_RANGE = (8, 128)  # an audit grid below 8^3 sees nothing; above 128^3 its features do not fit in memory


def grid_size(text: str) -> int:
    """argparse type: an audit grid edge within ``GRID_RANGE``."""
    value = int(_number(text, int))
    low, high = GRID_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value}: expected {low}..{high} voxels")
    return value


def dataset_bytes(data: Path) -> int:
    """The bytes of the NIfTI files under ``data`` (all sites of a cohort root): roughly what regenerating it writes."""
    return sum(path.stat().st_size for path in Path(data).rglob("*.nii*") if path.is_file())


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_new_outputs(paths: Sequence[Path], option: str = "--out", needed_bytes: int = 0) -> None:
    """Before any work: none of ``paths`` exists, and their folder is (or can be made) a writable folder.

    Every file a command would write counts, sidecars included (provenance, previews, an edited
    mask). ``needed_bytes`` is the command's estimate of what it will write; a disk with less free
    space is refused before the work starts. Raises ``DataError`` naming ``option``, the path and
    the problem.
    """
    from gem3d.errors import DataError

    for path in paths:
        if path.exists() or path.is_symlink():
            raise DataError(
                f"{option} {paths[0]}: {path} already exists; choose a new {option} (nothing is overwritten)"
            )
    check_writable(paths[0], option, needed_bytes)


def check_writable(path: Path, option: str = "--out", needed_bytes: int = 0) -> None:
    """Before any work: ``path`` (existing or not) lies in a writable folder with ``needed_bytes`` free.

    Raises ``DataError`` naming ``option``, the path and the problem.
    """
    import tempfile

    from gem3d.errors import DataError

    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{option} {path}: {folder} is not a folder")
    try:  # a probe finds what permission bits do not: a read-only mount, no inodes left, root squash
        with tempfile.TemporaryFile(dir=folder, prefix=".gem3d-probe."):
            pass
    except OSError as error:
        raise DataError(f"{option} {path}: cannot write in {folder} ({error.strerror})") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise DataError(f"{option} {path}: needs about {_size(needed_bytes)} in {folder}, which has {_size(free)} free")


def check_outside(out: Path, option: str, inputs: Mapping[str, Path | None]) -> None:
    """Before any work: ``out`` is neither one of ``inputs`` (option -> folder) nor inside one.

    An output written into an input folder would become part of that input (an extra "case" of a
    dataset, a stray folder in a run); the same path in and out would overwrite the input.
    """
    from gem3d.errors import DataError

    target = out.expanduser().resolve()
    for name, folder in inputs.items():
        if folder is None:
            continue
        source = folder.expanduser().resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "inside"
            raise DataError(
                f"{option} {out}: {where} {name} {folder}; write outputs outside the input folder (nothing is changed)"
            )


PROVENANCE_BYTES = 2**20  # a provenance or report JSON: a few KiB in practice; 1 MiB bounds it


def png_bytes(width_in: float, height_in: float, dpi: int) -> int:
    """An upper bound on a matplotlib PNG of this size: its RGBA pixels uncompressed, plus the PNG's overhead."""
    return int(width_in * dpi) * int(height_in * dpi) * 4 + 2**16


def add_config_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config",
        required=required,
        default=None if required else ConfigOptions.config,
        help="a TOML config file, or the name of a bundled one: tiny, brats, abdomenct1k (default: tiny)",
    )
    parser.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="override one config field, e.g. --set train.device=cuda (repeatable; VALUE is parsed as TOML)",
    )


def load_cli_config(
    config: str,
    set_items: Sequence[str],
    extra: dict[str, Any] | None = None,
    dataset: Path | None = None,
) -> Config:
    """The config named by ``--config`` with ``--set`` and command-specific overrides applied.

    Args:
        config: a TOML file or the name of a bundled config (``--config``).
        set_items: ``SECTION.FIELD=VALUE`` overrides (the ``--set`` items); errors name them as ``--set``.
        dataset: a dataset folder whose declarations (``gem3d.data.layouts.declared_data``: its
            number of labels, its modality) decide those fields; a ``--set`` that contradicts
            them is refused.
    """
    path = Path(config).expanduser()
    if path.is_dir():
        raise ConfigError(f"--config {config}: is a folder; expected a TOML file or a bundled config name")
    overrides = parse_overrides(list(set_items))
    if dataset is not None and dataset.is_dir():
        from gem3d.data.layouts import declared_data

        for key, value in declared_data(dataset).items():
            if key in overrides and overrides[key] != value:
                raise ConfigError(
                    f"--set {key}={overrides[key]}: {dataset} declares {key.removeprefix('data.')} = {value}"
                )
            overrides[key] = value
    overrides.update(extra or {})
    return load_config(resolve_config_path(config), overrides, override_source="--set")


def add_track_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--track DIR|off``: the MLflow store folder of this command's run (``default`` names it)."""
    parser.add_argument(
        "--track",
        help=f"MLflow store folder (default: {default}; MLFLOW_TRACKING_URI wins); 'off' disables tracking",
    )


def open_tracker(
    track: str | None, default_store: Path, command: str, run_name: str, cfg: Config | None = None
) -> Tracker | None:
    """The MLflow run of one command, or None with ``--track off``.

    The run goes to experiment ``gem3d-<command>`` in ``track`` (else ``default_store``), with the
    flattened config as params. Use it as a context manager: the run ends FAILED if the command raised.
    Tracking never breaks the command: an unreachable store warns once and the tracker turns no-op.
    """
    if track == "off":
        return None
    tracker = Tracker(Path(track) if track else default_store, f"gem3d-{command}", run_name)
    if cfg is not None:
        tracker.log_params(flatten_config(cfg))
    return tracker


def add_track_option(parser: argparse.ArgumentParser) -> None:
    """``--track DIR|off`` of a sampling or analysis command; the default store is beside ``--out``."""
    add_track_argument(parser, "mlflow/ beside --out, in its parent folder")


def default_store(out: Path) -> Path:
    """The MLflow store of a command writing ``out``: ``mlflow/`` beside it, in its parent folder.

    Beside, never inside: an output dataset must stay a clean nnU-Net raw folder, and the outputs
    of one project folder (the demo's ``demo_out/``) share one store.
    """
    return out.parent / "mlflow"


def _run_name(out: Path) -> str:
    name = out.name
    for suffix in (".nii.gz", ".nii", ".json"):
        name = name.removesuffix(suffix)
    return name or out.name


class CommandRun:
    """A command's MLflow run (or none, with ``--track off``) and its wall-clock time.

    Args:
        tracker: the open run, or None when tracking is off.
        started: ``time.perf_counter()`` when the command began (model loading counts).
    """

    def __init__(self, tracker: Tracker | None, started: float) -> None:
        self.tracker = tracker
        self.started = started

    def finish(
        self,
        cases: int | None,
        metrics: Mapping[str, Any] | None = None,
        artifacts: Sequence[tuple[Path, str | None]] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Log the outcome: ``cases`` written, seconds, extra ``metrics``, ``tags`` and ``artifacts``.

        Args:
            cases: volumes written (None for a command that writes none, such as the audit).
            artifacts: (file or folder, artifact folder or None) pairs; missing paths are skipped.
        """
        if self.tracker is None:
            return
        seconds = time.perf_counter() - self.started
        figures: dict[str, Any] = {"seconds_total": seconds}
        if cases is not None:
            figures["cases"] = cases
            if cases > 0:
                figures["seconds_per_volume"] = seconds / cases
        self.tracker.log_metrics({**figures, **(metrics or {})})
        self.tracker.set_tags(tags or {})
        for path, folder in artifacts:
            if path.exists():
                self.tracker.log_artifact(path, folder)


@contextmanager
def tracked(
    options: TrackedOptions,
    command: str,
    cfg: Config | None,
    started: float,
    checkpoints: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[CommandRun]:
    """The MLflow run of one sampling or analysis command, in experiment ``gem3d-<command>``.

    Opens the run in ``--track`` (default: ``default_store(options.out)``) with the config's flattened
    fields and the command's options (``CommandOptions.params``) as params, the checkpoint hashes as tags
    (``checkpoint_sha256.<stage>``) and the config as ``config.json``. The run ends FAILED if the
    block raises. Tracking never breaks the command: a store that cannot be written warns once and
    the rest of the logging is skipped.

    Args:
        cfg: the config the command ran with (the checkpoint's), or None.
        started: ``time.perf_counter()`` at the command's start, for ``seconds_total``.
        checkpoints: stage -> sha256 of the checkpoint files used.
    """
    tracker = open_tracker(options.track, default_store(options.out), command, _run_name(options.out), cfg)
    if tracker is None:
        yield CommandRun(None, started)
        return
    with tracker:
        tracker.log_params(options.params())
        hashes = {f"checkpoint_sha256.{stage}": digest for stage, digest in (checkpoints or {}).items()}
        tracker.set_tags({"gem3d.command": command, **hashes, **(tags or {})})
        if cfg is not None:
            tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
        yield CommandRun(tracker, started)
