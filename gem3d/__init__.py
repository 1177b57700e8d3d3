"""GEM-3D: generative enhancement for 3D medical images (the method, free of flwr/opacus/mlflow)."""

from __future__ import annotations

__version__ = "0.1.0"
