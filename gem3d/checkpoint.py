"""Checkpoint format: one safetensors file per stage, with JSON metadata in its header.

Tensors are namespaced: ``model.*`` (online weights), ``ema.*`` (EMA weights, used for
sampling), ``optim.<i>.<name>`` (optimizer state, for bit-exact resume), ``rng.cpu`` (the data
and noise generator). The header's ``gem3d`` entry is JSON: format, stage, step, config, data
fingerprint, library versions, optimizer hyperparameters. Writes are atomic (temp file, then
rename); loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gem3d.errors import CheckpointError

FORMAT = "gem3d-checkpoint/1"
_META_KEY = "gem3d"


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint and provenance file."""
    import monai
    import numpy

    import gem3d

    return {
        "gem3d": gem3d.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {_META_KEY: json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(contiguous, tmp_name, metadata=header)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no gem3d metadata")
    metadata: dict[str, Any] = json.loads(header[_META_KEY])
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {metadata.get('format')!r}")
    return metadata


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a checkpoint, tensors on CPU."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error})") from None
    return tensors, metadata


def subset(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed."""
    start = len(prefix) + 1
    return {name[start:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer's state into tensors (``optim.<i>.<name>``) and JSON hyperparameters."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> None:
    """Restore what ``optimizer_tensors`` split."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in subset(tensors, "optim").items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def file_sha256(path: str | Path) -> str:
    """Hash a checkpoint file, for provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
