"""Evaluation reports as JSON: strict JSON (no NaN/Infinity tokens), written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gem3d.files import atomic_write


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
    """Write ``report`` as indented strict JSON in its own key order, atomically (``gem3d.files.atomic_write``).

    Not ``gem3d.files.write_json``: a report keeps the protocol's section order (no sorted keys)
    and refuses NaN and Infinity tokens (``json_ready`` spells them as strings first).
    """
    text = json.dumps(json_ready(report), indent=2, allow_nan=False, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))
