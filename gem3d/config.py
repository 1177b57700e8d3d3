"""Configuration: one frozen pydantic model per concern, loaded from TOML.

The CLI and Flower's ``run_config`` only override fields. Flower accepts scalar values only, so
list-valued fields also accept comma-separated strings (``"32,64,128"``).
"""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gem3d.errors import ConfigError


def _split_scalar_list(value: Any) -> Any:
    """Accept ``"1,2,4"`` for a list field, since Flower's run_config carries only scalars."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


IntList = Annotated[tuple[int, ...], BeforeValidator(_split_scalar_list)]
BoolList = Annotated[tuple[bool, ...], BeforeValidator(_split_scalar_list)]
# UNet level widths: at least one level, each at least one channel.
ChannelList = Annotated[
    tuple[Annotated[int, Field(ge=1)], ...], BeforeValidator(_split_scalar_list), Field(min_length=1)
]


class FieldError(ValueError):
    """A cross-field check failed; ``field`` is the dotted field to blame, relative to the model checked."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _check_unet(
    channels: tuple[int, ...], attention_levels: tuple[bool, ...], norm_num_groups: int, num_head_channels: int
) -> None:
    """What MONAI's ``DiffusionModelUNet`` (and the stage-2 slice-axis layers) need, checked before it is built.

    Group norm runs on every level's channels; attention runs at the levels marked in
    ``attention_levels`` and always in the middle block (the last level), with
    ``channels // num_head_channels`` heads.
    """
    if len(attention_levels) != len(channels):
        raise FieldError(
            "attention_levels",
            f"has {len(attention_levels)} entries but channels {list(channels)} has {len(channels)} levels "
            f"(one true/false per level)",
        )
    common = math.gcd(*channels)
    if common % norm_num_groups:
        raise FieldError(
            "norm_num_groups",
            f"{norm_num_groups} does not divide every level of channels {list(channels)} "
            f"(valid: a divisor of {common}: {_divisors(common)})",
        )
    attended = sorted({c for c, attend in zip(channels, attention_levels, strict=True) if attend} | {channels[-1]})
    common = math.gcd(*attended)
    if common % num_head_channels:
        raise FieldError(
            "num_head_channels",
            f"{num_head_channels} does not divide the attended channels {attended} (the levels marked in "
            f"attention_levels and the last, middle-block level; valid: a divisor of {common}: {_divisors(common)})",
        )


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
    field_of_view_mm: float | None = Field(
        None,
        gt=0,
        description="in-plane field of view in mm, the same for every case and for masks on their own, centred on "
        "the foreground; None: each case's own foreground box (right only when the labels cover the whole body)",
    )
    channel: int = Field(0, ge=0, description="which image channel (_000C) to read in multi-channel datasets")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> Self:
        low, high = self.mri_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise FieldError("mri_percentiles", f"{[low, high]} must be [low, high] with 0 <= low < high <= 100")
        if not self.ct_window[0] < self.ct_window[1]:
            raise FieldError("ct_window", f"{list(self.ct_window)} must be [low, high] HU with low < high")
        return self


class UNetConfig(_Frozen):
    """The MONAI ``DiffusionModelUNet`` (2D) shared by the slice denoiser and the informed-slice generator."""

    channels: ChannelList = (32, 64)
    attention_levels: BoolList = (False, True)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _fits_the_unet(self) -> Self:
        _check_unet(self.channels, self.attention_levels, self.norm_num_groups, self.num_head_channels)
        return self


class ModelConfig(UNetConfig):
    """The slice denoiser (a MONAI ``DiffusionModelUNet``, 2D) and its stage-2 inflation."""

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
    latent: bool = Field(
        False,
        description="run the denoiser and the informed generator on the slices' latents (the [autoencoder] stage 0); "
        "masks enter at latent resolution as one-hot channels averaged over each latent pixel's area",
    )


class InformedModelConfig(UNetConfig):
    """The informed-slice generator: a 2D diffusion model conditioned on slice position."""

    position_bins: int = Field(64, ge=2, description="normalised slice position is quantised into this many classes")
    condition_on_mask: bool = Field(True, description="also condition on the mask slice at that position")


class AutoencoderConfig(_Frozen):
    """The stage-0 slice autoencoder of a latent model (``model.latent``): MONAI's ``AutoencoderKL``, 2D.

    Each level but the last halves the slice, so the latent is ``latent_channels`` x (H / f) x (W / f)
    with f = 2 ** (len(channels) - 1): 4 for three levels, 8 for four. Trained on single slices
    with an L1 or L2 reconstruction loss, a KL term and optionally a patch-adversarial term
    (``adversarial_weight``; a discriminator trained alongside, no network that would have to be
    downloaded), or loaded from a local file (``checkpoint``). Only images pass through it: masks
    never do.
    """

    channels: ChannelList = (32, 64, 64)
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    attention: bool = Field(False, description="self-attention in the middle of the encoder and the decoder")
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (summed over latent elements)")
    latent_scale: float | Literal["auto"] = Field(
        "auto",
        description="latents are multiplied by this before diffusion; auto: 1 / std of the posterior means of the "
        "training slices, measured when a centralized, non-private stage 0 ends (1.0 after a DP or federated one)",
    )
    checkpoint: str | None = Field(
        None,
        description="a local pretrained autoencoder instead of stage 0: a gem3d autoencoder checkpoint, or the "
        "state dict of a MONAI AutoencoderKL of this shape (.safetensors, or .pt/.pth loaded with weights_only)",
    )
    adversarial_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a patch-adversarial term (MONAI PatchDiscriminator, least squares) in the stage-0 "
        "loss; 0: none. The discriminator trains with the autoencoder (one loss, disjoint gradients)",
    )
    discriminator_channels: int = Field(32, ge=1, description="channels of the discriminator's first layer")
    discriminator_layers: int = Field(
        3, ge=1, description="the discriminator's layers: each patch it judges is about 2^(layers+2) pixels wide"
    )

    @property
    def factor(self) -> int:
        """f: how many pixels of a slice side one latent pixel covers."""
        return 2 ** (len(self.channels) - 1)

    @model_validator(mode="after")
    def _fits_the_autoencoder(self) -> Self:
        common = math.gcd(*self.channels)
        if common % self.norm_num_groups:
            raise FieldError(
                "norm_num_groups",
                f"{self.norm_num_groups} does not divide every level of channels {list(self.channels)} "
                f"(valid: a divisor of {common}: {_divisors(common)})",
            )
        if isinstance(self.latent_scale, float) and not self.latent_scale > 0:
            raise FieldError("latent_scale", f"{self.latent_scale} must be > 0 (or 'auto')")
        if self.adversarial_weight > 0 and self.discriminator_channels % self.norm_num_groups:
            raise FieldError(
                "discriminator_channels",
                f"{self.discriminator_channels} is not divisible by norm_num_groups = {self.norm_num_groups} "
                f"(valid: a multiple of {self.norm_num_groups})",
            )
        return self

    def discriminator_input_min(self) -> int:
        """The smallest slice side the discriminator can judge: its output, side / 2^layers - 2, is >= 1."""
        return 3 * 2**self.discriminator_layers


class DiffusionConfig(_Frozen):
    """Noising process, schedule and sampler (``gem3d.diffusion``). Not model state."""

    process: Literal["ddpm", "rflow"] = Field(
        "ddpm", description="ddpm: beta schedule, sampled with DDIM; rflow: rectified flow, sampled with Euler steps"
    )
    num_train_timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0)
    beta_end: float = Field(0.0195, gt=0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon", description="what the network predicts; rflow needs v_prediction (the velocity x0 - noise)"
    )
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform", description="min_snr: Min-SNR-gamma loss weights (Hang et al. 2023), ddpm only"
    )
    min_snr_gamma: float = Field(5.0, gt=0)
    inference_steps: int = Field(20, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta: 0 is deterministic given the initial noise")

    @model_validator(mode="after")
    def _schedule_is_consistent(self) -> Self:
        if self.process == "rflow":
            if self.prediction_type != "v_prediction":
                raise FieldError(
                    "prediction_type",
                    f"'{self.prediction_type}' with process = 'rflow': rectified flow predicts the velocity, "
                    "set prediction_type = 'v_prediction'",
                )
            if self.loss_weighting != "uniform":
                raise FieldError("loss_weighting", f"'{self.loss_weighting}' applies to process = 'ddpm' only")
            if self.eta > 0:
                raise FieldError("eta", f"{self.eta}: rectified flow samples deterministically, set eta = 0")
        if self.inference_steps > self.num_train_timesteps:
            raise FieldError(
                "inference_steps",
                f"{self.inference_steps} exceeds num_train_timesteps = {self.num_train_timesteps} "
                f"(valid: 1..{self.num_train_timesteps})",
            )
        if self.schedule != "cosine" and self.beta_end <= self.beta_start:  # the cosine schedule ignores both
            raise FieldError("beta_end", f"{self.beta_end} must be greater than beta_start = {self.beta_start}")
        return self


class TrainConfig(_Frozen):
    """Optimisation shared by the three training stages."""

    steps_autoencoder: int = Field(300, ge=0)
    steps_slice: int = Field(300, ge=0)
    steps_volume: int = Field(200, ge=0)
    steps_informed: int = Field(300, ge=0)
    batch_size: int = Field(4, ge=1, description="windows (or slices, for the informed generator) per step")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(
        False,
        description="the EMA's decay after n updates is min(ema_decay, (1 + n) / (10 + n)), so a short run's EMA is "
        "not mostly its random start (the baselines of a short evaluation use it)",
    )
    seed: int = 0
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    checkpoint_every: int = Field(
        100, ge=0, description="also checkpoint every N steps, so a kill loses at most N (0: only at the end)"
    )
    volume_train_all: bool = Field(False, description="stage 2 trains every parameter, not only the slice-axis layers")
    volume_t_power: float = Field(
        1.0, gt=0, description="stage 2 draws t = T * u**p; p > 1 favours small t, as the reference does"
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="worker processes drawing training batches ahead of the step (None: 0 on a CPU, up to 4 on "
        "a GPU); the batches, and so the trained weights, are the same for any number",
    )
    prefetch_batches: int = Field(2, ge=1, description="batches each loader worker keeps ready")
    informed_from: Literal["window", "volume"] = Field(
        "window", description="where the informed slice of a training window is drawn from"
    )
    appearance_log_gamma: float = Field(
        0.0,
        ge=0,
        le=2,
        description="appearance augmentation of stages 1 and 2: each training window and its informed slice "
        "share a contrast curve u ** g, log g ~ U(-a, a) (0: off); see gem3d.data.windows.with_contrast_curves",
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

    rounds_autoencoder: int = Field(0, ge=0, description="rounds of the stage-0 autoencoder (latent models)")
    rounds_slice: int = Field(2, ge=0)
    rounds_volume: int = Field(1, ge=0)
    rounds_informed: int = Field(1, ge=0)
    local_steps: int = Field(20, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "krum"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    min_clients: int = Field(1, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="per-round EMA decay of the global weights (with warm-up); default train.ema_decay ** "
        "local_steps, the horizon in local steps of centralized training",
    )


Switch = Literal["auto", "on", "off"]


class AccelConfig(_Frozen):
    """The GPU fast path (``gem3d.accel``). ``auto`` is on for CUDA and off on a CPU, so a CPU run
    computes exactly what it always did; every switch only changes speed, memory and rounding."""

    bf16: Switch = Field(
        "auto", description="bf16 autocast of the networks' forward (the noise schedule arithmetic stays fp32/fp64)"
    )
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on CUDA (no effect on a CPU)")
    flash_attention: Switch = Field("auto", description="fused scaled-dot-product attention in MONAI's blocks")
    channels_last: Switch = Field("auto", description="channels-last memory format for the 2D convolutions")
    compile: bool = Field(False, description="torch.compile the networks (slow first steps, faster after)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode when compile is on: reduce-overhead replays CUDA graphs (fewer kernel "
        "launches, more memory); max-autotune also searches kernel configurations (minutes of compiling)",
    )
    deterministic: bool = Field(
        True,
        description="CUDA: deterministic kernels (cuDNN, cuBLAS, torch.use_deterministic_algorithms), so a seed "
        "gives the same bytes on the same device; off trades that for speed (no effect on a CPU)",
    )


class Config(_Frozen):
    """Everything a gem3d run needs."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    informed: InformedModelConfig = InformedModelConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    release: ReleaseConfig = ReleaseConfig()
    federation: FederationConfig = FederationConfig()
    accel: AccelConfig = AccelConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> Self:
        levels = max(len(self.model.channels), len(self.informed.channels))
        factor = 2 ** (levels - 1)  # every level but the last halves the slice
        which = "model" if len(self.model.channels) == levels else "informed"
        need = f"the {levels} levels of {which}.channels need"
        if self.model.latent:  # the UNets halve the latent, which is the slice / f
            factor *= self.autoencoder.factor
            need = f"the autoencoder's f = {self.autoencoder.factor} times the {levels} levels of {which}.channels need"
        if self.data.image_size % factor:
            raise FieldError(
                "data.image_size",
                f"{self.data.image_size} is not divisible by {factor}, which {need} "
                f"(valid: a multiple of {factor}, at least 8)",
            )
        smallest = self.autoencoder.discriminator_input_min()
        if self.model.latent and self.autoencoder.adversarial_weight > 0 and self.data.image_size < smallest:
            raise FieldError(
                "autoencoder.discriminator_layers",
                f"{self.autoencoder.discriminator_layers} layers need slices of at least {smallest} pixels "
                f"(data.image_size = {self.data.image_size}); use fewer layers or no adversarial term",
            )
        if self.sampler.overlap >= self.data.window:
            raise FieldError(
                "sampler.overlap",
                f"{self.sampler.overlap} carried slices leave no new slice in a window of data.window = "
                f"{self.data.window} (valid: 0..{self.data.window - 1})",
            )
        return self


def _error_field(error: Any) -> str:
    """The dotted field a pydantic error blames; a ``FieldError`` names its own, below the model's location."""
    parts = [str(part) for part in error["loc"]]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        parts.append(cause.field)
    return ".".join(parts) or "(top level)"


def _error_message(error: Any) -> str:
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if isinstance(cause, FieldError) else str(error["msg"])


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: the source, the first failing field and its problem (and how many more there are)."""
    first = error.errors()[0]
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: field '{_error_field(first)}': {_error_message(first)}{more}"


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a nested dict into a ``Config``; raise ``ConfigError`` naming the source and field."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, override_source: str = "override"
) -> Config:
    """Load a TOML config (defaults when ``path`` is None) and apply dotted overrides.

    An invalid result is blamed on the override that set the failing field; failing that, on the
    overrides of its section when the file alone is valid; otherwise on the file.

    Args:
        path: a TOML file with the sections of ``Config``.
        overrides: ``{"train.steps_slice": 10, ...}``; Flower run_config keys in kebab-case
            (``"train.steps-slice"``) are accepted too.
        override_source: how an error names an override, e.g. ``"--set"`` for the CLI's option.
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
    if not overrides:
        return config_from_dict(raw, source)
    combined = copy.deepcopy(raw)  # the file's own dict stays as it is, to be validated alone on an error
    for key, value in overrides.items():
        apply_override(combined, key, value)
    try:
        return Config.model_validate(combined)
    except ValidationError as error:
        blamed = _blamed_overrides(error, overrides, raw)
        if blamed:
            source = ", ".join(f"{override_source} {key}={_shown(overrides[key])}" for key in blamed)
        raise ConfigError(format_validation_error(source, error)) from None


def _blamed_overrides(error: ValidationError, overrides: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The overrides a validation error is theirs, or [] when the file is to blame."""
    field = _error_field(error.errors()[0])
    names = {key: key.replace("-", "_") for key in overrides}
    exact = [key for key, name in names.items() if field == name or field.startswith(name + ".")]
    if exact:
        return exact
    try:
        Config.model_validate(raw)
    except ValidationError:
        return []  # the file is invalid on its own
    section = field.split(".")[0]
    same_section = [key for key, name in names.items() if name.split(".")[0] == section]
    return same_section or list(overrides)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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
