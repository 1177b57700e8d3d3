"""Configuration: one frozen pydantic model per concern, loaded from TOML.

The CLI and Flower's ``run_config`` only override fields. Flower accepts scalar values only, so
list-valued fields also accept comma-separated strings (``"32,64,128"``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from gem3d.errors import ConfigError


def _split_scalar_list(value: Any) -> Any:
    """Accept ``"1,2,4"`` for a list field, since Flower's run_config carries only scalars."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


IntList = Annotated[tuple[int, ...], BeforeValidator(_split_scalar_list)]
BoolList = Annotated[tuple[bool, ...], BeforeValidator(_split_scalar_list)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """How volumes become training slices.

    Arrays inside gem3d are slice-first: ``[D, H, W]`` with D along ``slice_axis`` of the
    canonical (RAS) volume.
    """

    image_size: int = Field(32, ge=8, description="in-plane size H = W after resizing")
    window: int = Field(8, ge=1, description="W, consecutive slices per training window")
    num_labels: int = Field(4, ge=2, description="label ids 0..num_labels-1, background included")
    slice_axis: Literal[0, 1, 2] = Field(2, description="canonical axis slices are taken along (2 = axial)")
    modality: Literal["mri", "ct"] = "mri"
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-160.0, 240.0)
    target_spacing: tuple[float, float, float] | None = Field(
        None, description="resample to this spacing in mm before slicing; None keeps the native spacing"
    )
    crop_foreground: bool = True
    channel: int = Field(0, ge=0, description="which image channel (_000C) to read in multi-channel datasets")


class ModelConfig(_Frozen):
    """The slice denoiser (a MONAI ``DiffusionModelUNet``, 2D) and its stage-2 inflation."""

    channels: IntList = (32, 64)
    attention_levels: BoolList = (False, True)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(16, ge=1)
    mask_encoding: Literal["onehot", "scaled"] = Field(
        "onehot",
        description="onehot: one channel per foreground label; scaled: one channel, label / (L-1) in [-1, 1]",
    )
    informed_slice: bool = Field(
        True, description="condition on the informed slice; false gives the mask-only baseline of the evaluation"
    )
    informed_mask: bool = Field(
        True, description="also feed the informed slice's own mask, so the net knows which pixels are which label"
    )
    temporal_kernel: int = Field(3, ge=1, description="kernel of the slice-axis 1D convs added in stage 2")
    temporal_attention: bool = Field(True, description="add slice-axis self-attention where there is spatial attention")


class InformedModelConfig(_Frozen):
    """The informed-slice generator: a 2D diffusion model conditioned on slice position."""

    channels: IntList = (32, 64)
    attention_levels: BoolList = (False, True)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(16, ge=1)
    position_bins: int = Field(64, ge=2, description="normalised slice position is quantised into this many classes")
    condition_on_mask: bool = Field(True, description="also condition on the mask slice at that position")


class DiffusionConfig(_Frozen):
    """Noise schedule and sampler, built from ``monai.networks.schedulers``. Not model state."""

    num_train_timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0)
    beta_end: float = Field(0.0195, gt=0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    inference_steps: int = Field(20, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta: 0 is deterministic given the initial noise")


class TrainConfig(_Frozen):
    """Optimisation shared by the three training stages."""

    steps_slice: int = Field(300, ge=0)
    steps_volume: int = Field(200, ge=0)
    steps_informed: int = Field(300, ge=0)
    batch_size: int = Field(4, ge=1, description="windows (or slices, for the informed generator) per step")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: only at the end)")
    volume_train_all: bool = Field(False, description="stage 2 trains every parameter, not only the slice-axis layers")
    volume_t_power: float = Field(
        1.0, gt=0, description="stage 2 draws t = T * u**p; p > 1 favours small t, as the reference does"
    )
    informed_from: Literal["window", "volume"] = Field(
        "window", description="where the informed slice of a training window is drawn from"
    )


class SamplerConfig(_Frozen):
    """Bi-directional overlapped volume sampling."""

    overlap: int = Field(
        2, ge=0, description="h, slices carried between consecutive windows; 0 gives independent windows (a baseline)"
    )
    batch_volumes: int = Field(4, ge=1, description="volumes whose windows are denoised in one batch")


class PrivacyConfig(_Frozen):
    """DP-SGD per site (Opacus) and the privacy budget."""

    enabled: bool = False
    noise_multiplier: float | None = Field(1.0, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    budget_epsilon: float = Field(10.0, gt=0, description="a site refuses training that would exceed this")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["auto", "loop", "vmap", "hooks"] = Field(
        "auto",
        description="per-window gradients: one backward per window (loop), torch.func (vmap), Opacus "
        "hooks summed per window (hooks), or the measured default for the device (auto); see privacy/dp_sgd.py",
    )


class ReleaseConfig(_Frozen):
    """The canonical grid of a privacy release (``gem3d release``): no source geometry survives.

    Every released volume is written in RAS+ voxel order on one grid: ``depth`` slices of
    ``image_size`` x ``image_size`` pixels (the model grid's field of view, resampled along the
    slice axis), isotropic ``spacing_mm`` voxels, centred on the world origin. Each case's own
    field of view is therefore scaled to the same box: physical size is not kept, on purpose.
    """

    depth: int = Field(0, ge=0, description="slices of every released volume (0: data.image_size, a cube)")
    spacing_mm: float = Field(1.0, gt=0, description="isotropic voxel size written in released headers")


class FederationConfig(_Frozen):
    """Federated rounds and the aggregation strategy."""

    rounds_slice: int = Field(2, ge=0)
    rounds_volume: int = Field(1, ge=0)
    rounds_informed: int = Field(1, ge=0)
    local_steps: int = Field(20, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "krum"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    min_clients: int = Field(1, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)


class Config(_Frozen):
    """Everything a gem3d run needs."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    informed: InformedModelConfig = InformedModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    release: ReleaseConfig = ReleaseConfig()
    federation: FederationConfig = FederationConfig()


def _format_validation_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: field '{field}': {first['msg']}{more}"


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a nested dict into a ``Config``; raise ``ConfigError`` naming the source and field."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config (defaults when ``path`` is None) and apply dotted overrides.

    Args:
        path: a TOML file with the sections of ``Config``.
        overrides: ``{"train.steps_slice": 10, ...}``; Flower run_config keys in kebab-case
            (``"train.steps-slice"``) are accepted too.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value)
    return config_from_dict(raw, source)


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[section][field] = value`` from ``"section.field"`` (kebab-case allowed)."""
    parts = key.replace("-", "_").split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def flatten_config(config: Config) -> dict[str, Any]:
    """``{"data.image_size": 32, ...}``: for logging params and provenance."""
    flat: dict[str, Any] = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
