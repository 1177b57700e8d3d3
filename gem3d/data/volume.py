"""The in-memory training unit: one case, slice-first and normalised."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Volume:
    """One preprocessed case.

    Attributes:
        case_id: the case's id in its dataset.
        image: ``[D, H, W]`` float32 intensities in [-1, 1], slices along the first axis.
        label: ``[D, H, W]`` uint8 contiguous label ids 0..num_labels-1.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray

    @property
    def depth(self) -> int:
        return int(self.image.shape[0])


def fingerprint(volumes: list[Volume], key: bytes | None = None) -> str:
    """A sha256 over ids, shapes and voxels: identifies the data a checkpoint was trained on.

    With ``key`` (a site's secret, ``privacy.site_state``) it is an HMAC-SHA256: only the holder
    of the key can compute or confirm it, so a fingerprint that leaves the site cannot be used to
    test a guess of its patients' voxels; it is then prefixed ``hmac-sha256:``. Without a key it
    is a plain hash, for data that is not private.
    """
    digest = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for volume in sorted(volumes, key=lambda v: v.case_id):
        digest.update(volume.case_id.encode())
        digest.update(str(volume.image.shape).encode())
        digest.update(np.ascontiguousarray(volume.image, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(volume.label, dtype=np.uint8).tobytes())
    return f"hmac-sha256:{digest.hexdigest()}" if key is not None else digest.hexdigest()
