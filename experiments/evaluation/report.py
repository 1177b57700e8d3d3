"""Evaluation reports as JSON: strict JSON (no NaN/Infinity tokens), written atomically."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def json_ready(value: Any) -> Any:
    """Recursively turn a report into strict-JSON values.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (PSNR of identical
    volumes is infinite; JSON has no token for it); numpy/torch scalars become Python numbers;
    tuples become lists; mapping keys become strings.
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write ``report`` as indented strict JSON via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_ready(report), indent=2, allow_nan=False, sort_keys=False) + "\n"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path
