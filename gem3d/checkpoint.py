"""Checkpoint format: one safetensors file per stage, with JSON metadata in its header.

Tensors are namespaced: ``model.*`` (online weights), ``ema.*`` (EMA weights, used for
sampling), ``optim.<i>.<name>`` (optimizer state, for bit-exact resume). There is no generator
state: a step's draws follow from the seed and the step (``gem3d.data.loader``). The header's
``gem3d`` entry is JSON (``CheckpointMetadata``): format, stage, step, config, data fingerprint,
library versions, optimizer hyperparameters, and two checksums: ``tensors_sha256`` over the
tensor payload and ``metadata_sha256`` over the rest of the metadata, so a flipped byte or a
hand-edited config is refused at load. Writes are atomic (temp file, then rename); loading
never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from gem3d.config import format_validation_error
from gem3d.errors import CheckpointError
from gem3d.files import atomic_write

FORMAT = "gem3d-checkpoint/2"
# Format 1 carried no checksums: still loaded, with a warning that nothing was verified.
_LEGACY_FORMAT = "gem3d-checkpoint/1"
_META_KEY = "gem3d"
_SHA256 = r"^[0-9a-f]{64}$"
# Names of a state-dict mismatch quoted in its one-line error.
_QUOTED_NAMES = 3

LOG = logging.getLogger(__name__)


class CheckpointMetadata(BaseModel):
    """The ``gem3d`` header entry, validated at every load.

    Fields other writers add (``privacy``, ``num_cases``, ``federated``, ...) are kept as they are.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    format: Literal["gem3d-checkpoint/1", "gem3d-checkpoint/2"]
    stage: str = Field(min_length=1, description="the training stage (slice, volume, informed) or a baseline's name")
    step: int | None = Field(None, ge=0, description="optimizer steps taken")
    config: dict[str, Any] | None = Field(None, description="the gem3d Config the weights were trained with")
    data_fingerprint: str | None = None
    versions: dict[str, str] | None = None
    optimizer: list[dict[str, Any]] | None = Field(None, description="the optimizer's param_groups, for resume")
    tensors_sha256: str | None = Field(None, pattern=_SHA256)
    metadata_sha256: str | None = Field(None, pattern=_SHA256)

    @model_validator(mode="after")
    def _checksums_from_format_2(self) -> Self:
        if self.format == FORMAT and (self.tensors_sha256 is None or self.metadata_sha256 is None):
            raise ValueError(f"a {FORMAT} checkpoint must carry tensors_sha256 and metadata_sha256")
        return self


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


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _metadata_sha256(metadata: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``metadata`` without its own checksum."""
    fields = {key: value for key, value in metadata.items() if key != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically, with the checksums ``load_checkpoint`` verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    # Through JSON and back first, so the checksum is of exactly what a reader will parse (tuples, int keys).
    fields = json.loads(json.dumps({**metadata, "format": FORMAT, "tensors_sha256": tensors_sha256(contiguous)}))
    fields["metadata_sha256"] = _metadata_sha256(fields)
    header = {_META_KEY: json.dumps(fields, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated JSON metadata of a checkpoint, without loading its tensors.

    Checks the schema (``CheckpointMetadata``) and the metadata checksum; the tensor checksum is
    ``load_checkpoint``'s.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_one_line(error)})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no gem3d metadata")
    try:
        metadata = json.loads(header[_META_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: gem3d metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: gem3d metadata is a JSON {type(metadata).__name__}, not an object")
    if metadata.get("format") not in (FORMAT, _LEGACY_FORMAT):
        raise CheckpointError(f"{path}: unsupported checkpoint format {metadata.get('format')!r} (expected {FORMAT!r})")
    try:
        CheckpointMetadata.model_validate(metadata)
    except ValidationError as error:
        raise CheckpointError(format_validation_error(f"{path}: metadata", error)) from None
    if metadata["format"] == FORMAT and _metadata_sha256(metadata) != metadata["metadata_sha256"]:
        raise CheckpointError(f"{path}: metadata does not match its checksum (edited or corrupted after it was saved)")
    return metadata


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a checkpoint, tensors on CPU, both verified against their checksums."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({_one_line(error)})") from None
    expected = metadata.get("tensors_sha256")
    if expected is None:
        LOG.warning("%s: a %s checkpoint without checksums; its tensors are not verified", path, _LEGACY_FORMAT)
    elif tensors_sha256(tensors) != expected:
        raise CheckpointError(f"{path}: tensors do not match their checksum (the file is corrupt or was altered)")
    return tensors, metadata


def load_weights(module: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(weights)``, with any mismatch as one line: counts and the first names.

    Raises:
        CheckpointError: names missing from ``weights``, names ``module`` lacks, or shapes that differ.
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    reshaped = [
        f"{name} {list(weights[name].shape)} vs {list(tensor.shape)}"
        for name, tensor in expected.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    problems = [
        f"{len(names)} {what} ({_first(names)})"
        for names, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "with another shape"))
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit the network of its config: {'; '.join(problems)} "
            f"(of {len(expected)} tensors expected)"
        )
    try:
        module.load_state_dict(dict(weights))
    except RuntimeError as error:  # e.g. a dtype that cannot be copied in
        raise CheckpointError(f"{source}: weights do not load ({_one_line(error)})") from None


def _first(names: list[str]) -> str:
    more = f", ... {len(names) - _QUOTED_NAMES} more" if len(names) > _QUOTED_NAMES else ""
    return ", ".join(names[:_QUOTED_NAMES]) + more


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
