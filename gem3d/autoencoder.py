"""The slice autoencoder of latent GEM-3D (stage 0): MONAI's ``AutoencoderKL`` on single 2D slices.

A latent model (``model.latent``) runs its denoiser and informed generator on the latents of the
slices, ``[C, H/f, W/f]`` (``AutoencoderConfig``), instead of on the pixels: at 512² and f = 8 a
window costs what a 64² one costs in pixel space. The autoencoder is frozen inside those
networks (their ``codec``), so each stage checkpoint holds the codec it was trained with and
samples on its own.

* **Encoding** is deterministic: the posterior mean, times ``scale`` (a buffer: 1 / std of the
  training latents, ``AutoencoderConfig.latent_scale``), so the diffusion sees unit-scale latents.
* **Decoding** divides by ``scale`` and runs in bounded batches of slices (``decode_slices``).
* **Training** (``reconstruction_loss``): L1 or L2 reconstruction of a slice from a latent drawn
  with the reparameterisation noise passed in (drawn by the caller from the step's generator,
  never from the global RNG), plus ``kl_weight`` times the KL divergence to N(0, I).
* **Optional patch-adversarial term** (``adversarial_weight`` > 0, as in Esser et al.'s VQGAN and
  MONAI's generative tutorials; sharper decodes than L1 alone): a MONAI ``PatchDiscriminator``
  (``discriminator``, trained with the autoencoder, only in stage 0: a codec inside the denoisers
  has none) judges f-wide patches with the least-squares criterion. Both players' losses are in
  one per-slice loss with disjoint gradients: the autoencoder's term sees the discriminator with
  detached weights, the discriminator's sees the reconstruction detached. So one optimiser, one
  gradient clip, one DP-SGD mechanism (per-slice clipping covers both networks, whose weights
  both leave a site) and one federated average serve both. GroupNorm, not the default BatchNorm:
  a slice's loss must not depend on its batch-mates (DP's per-sample gradients).
* **Masks never pass through it**: ``area_downsample`` averages their one-hot channels over each
  latent pixel's f x f area, so a label's share of every latent pixel is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn
from torch.func import functional_call

from gem3d.checkpoint import load_checkpoint, load_weights, read_metadata, subset
from gem3d.config import AutoencoderConfig
from gem3d.errors import CheckpointError

# Slices decoded (or encoded) per network call when a caller gives no bound.
DEFAULT_SLICE_BATCH = 32


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()


class SliceAutoencoder(nn.Module):
    """``AutoencoderKL`` (2D, one channel) with the latent scale and bounded-batch helpers.

    ``compute_dtype``: the autocast dtype of its forward passes (``gem3d.accel``; None: fp32).
    ``discriminator``: stage 0's ``PatchDiscriminator`` when built ``with_discriminator`` (a codec
    inside a denoiser is built without one), else None.
    """

    scale: torch.Tensor

    def __init__(self, cfg: AutoencoderConfig, with_discriminator: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = AutoencoderKL(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=cfg.channels,
            latent_channels=cfg.latent_channels,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=(False,) * len(cfg.channels),
            norm_num_groups=cfg.norm_num_groups,
            with_encoder_nonlocal_attn=cfg.attention,
            with_decoder_nonlocal_attn=cfg.attention,
        )
        self.register_buffer("scale", torch.ones(()))
        self.compute_dtype: torch.dtype | None = None
        self.discriminator: PatchDiscriminator | None = None
        if with_discriminator:
            self.discriminator = PatchDiscriminator(
                spatial_dims=2,
                channels=cfg.discriminator_channels,
                in_channels=1,
                num_layers_d=cfg.discriminator_layers,
                norm=("GROUP", {"num_groups": cfg.norm_num_groups}),
            )
        self.adversarial = PatchAdversarialLoss(reduction="none", criterion="least_squares")

    @property
    def factor(self) -> int:
        return self.cfg.factor

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` slices in [-1, 1] -> ``[N, C, H/f, W/f]`` scaled posterior means (fp32)."""
        with _autocast(x, self.compute_dtype):
            mean, _ = self.net.encode(x)
        return mean.float() * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` scaled latents -> ``[N, 1, h*f, w*f]`` slices (fp32, not clamped)."""
        with _autocast(z, self.compute_dtype):
            out = self.net.decode(z / self.scale)
        return out.float()

    def reconstruction_loss(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``[B]`` training loss of each slice: reconstruction (mean per pixel) + ``kl_weight`` * KL (sum),
        plus, in training mode with a discriminator, the two adversarial terms (``adversarial_loss``).

        Args:
            x: ``[B, 1, H, W]`` slices in [-1, 1].
            noise: ``[B, C, H/f, W/f]`` unit Gaussian reparameterisation noise.
        """
        with _autocast(x, self.compute_dtype):
            mean, sigma = self.net.encode(x)
            recon = self.net.decode(mean + sigma * noise.to(mean.dtype))
        mean, sigma, recon = mean.float(), sigma.float(), recon.float()
        error = (recon - x).abs() if self.cfg.reconstruction_loss == "l1" else (recon - x) ** 2
        variance = sigma**2
        kl = 0.5 * (mean**2 + variance - torch.log(variance.clamp_min(1e-12)) - 1.0)
        loss = error.flatten(1).mean(dim=1) + self.cfg.kl_weight * kl.flatten(1).sum(dim=1)
        if self.discriminator is not None and self.training:  # validation scores the reconstruction alone
            loss = loss + self.adversarial_loss(x, recon)
        return loss

    def _judge(self, x: torch.Tensor, *, frozen: bool) -> torch.Tensor:
        """``[B, 1, h, w]`` the discriminator's patch logits for ``[B, 1, H, W]`` slices; ``frozen``:
        through detached weights, so the gradient reaches ``x`` only."""
        assert self.discriminator is not None
        with _autocast(x, self.compute_dtype):
            if frozen:
                weights = {name: p.detach() for name, p in self.discriminator.named_parameters()}
                logits = functional_call(self.discriminator, weights, (x,))[-1]
            else:
                logits = self.discriminator(x)[-1]
        return logits.float()

    def adversarial_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """``[B]``: ``adversarial_weight`` * the autoencoder's term (its reconstruction judged real) plus the
        discriminator's term (real judged real, reconstruction judged fake, halved), least squares, mean per patch.

        The gradients are disjoint: the first reaches the autoencoder only, the second the discriminator only.

        Args:
            x, recon: ``[B, 1, H, W]`` slices and their reconstructions.
        """

        def per_slice(logits: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
            elements = self.adversarial(logits, target_is_real=real, for_discriminator=for_discriminator)
            assert isinstance(elements, list)
            return elements[0].flatten(1).mean(dim=1)

        fooled = per_slice(self._judge(recon, frozen=True), True, False)
        caught = per_slice(self._judge(x, frozen=False), True, True) + per_slice(
            self._judge(recon.detach(), frozen=False), False, True
        )
        return self.cfg.adversarial_weight * fooled + 0.5 * caught


def area_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average over ``factor`` x ``factor`` pixel blocks of the last two dims.

    Args:
        x: ``[B, K, H, W]`` or ``[B, K, D, H, W]`` (e.g. one-hot mask channels).
    Returns:
        ``[B, K, H/f, W/f]`` or ``[B, K, D, H/f, W/f]``: for one-hot channels, each label's share
        of every latent pixel's area.
    """
    if factor == 1:
        return x
    if x.ndim == 5:
        return F.avg_pool3d(x, kernel_size=(1, factor, factor))
    return F.avg_pool2d(x, kernel_size=factor)


@torch.no_grad()
def encode_slices(codec: SliceAutoencoder, x: torch.Tensor, batch: int = DEFAULT_SLICE_BATCH) -> torch.Tensor:
    """Encode slices in bounded batches.

    Args:
        x: ``[B, 1, H, W]`` slices or ``[B, 1, D, H, W]`` windows.
    Returns:
        ``[B, C, h, w]`` or ``[B, C, D, h, w]`` latents.
    """
    if x.ndim == 4:
        return torch.cat([codec.encode(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
    b, _, d, h, w = x.shape
    flat = x.transpose(1, 2).reshape(b * d, 1, h, w)
    z = encode_slices(codec, flat, batch)  # [B*D, C, h', w']
    return z.reshape(b, d, *z.shape[1:]).transpose(1, 2)


@torch.no_grad()
def decode_slices(codec: SliceAutoencoder, z: torch.Tensor, batch: int = DEFAULT_SLICE_BATCH) -> torch.Tensor:
    """Decode ``[N, C, h, w]`` latents to ``[N, 1, H, W]`` slices, ``batch`` slices per network call."""
    return torch.cat([codec.decode(z[i : i + batch]) for i in range(0, z.shape[0], batch)])


@torch.no_grad()
def latent_scale(codec: SliceAutoencoder, slices: torch.Tensor) -> float:
    """1 / std of the unscaled posterior means of ``slices`` ``[N, 1, H, W]`` (Rombach et al.'s scale factor)."""
    previous = codec.scale.clone()
    codec.scale.fill_(1.0)
    try:
        std = float(encode_slices(codec, slices).std())
    finally:
        codec.scale.copy_(previous)
    return 1.0 / std if std > 0 else 1.0


def pretrained_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``AutoencoderKL`` state dict in a local file (never downloaded, never unpickled freely).

    Accepted: a gem3d autoencoder checkpoint (its EMA weights), a ``.safetensors`` state dict, or a
    ``.pt``/``.pth``/``.ckpt``/``.bin`` file loaded with ``torch.load(weights_only=True)`` (a state
    dict, or a dict holding one under ``state_dict``). Names may carry a ``net.`` prefix (this
    module's) or none (MONAI's ``AutoencoderKL``). A ``scale`` entry sets the latent scale.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained autoencoder file not found (autoencoder.checkpoint)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                is_gem3d = "gem3d" in (handle.metadata() or {})
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        if is_gem3d:
            metadata = read_metadata(path)
            if metadata["stage"] != "autoencoder":
                raise CheckpointError(f"{path}: holds a '{metadata['stage']}'-stage checkpoint, not an autoencoder")
            tensors, _ = load_checkpoint(path)
            weights = subset(tensors, "ema")
        else:
            from safetensors.torch import load_file

            weights = load_file(str(path))
    elif suffix in (".pt", ".pth", ".ckpt", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a file that is not a weights-only pickle
            raise CheckpointError(f"{path}: not a weights-only torch file ({type(error).__name__})") from None
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(f"{path}: holds no state dict of tensors")
        weights = dict(loaded)
    else:
        raise CheckpointError(
            f"{path}: unknown autoencoder file type '{suffix}' (.safetensors, .pt, .pth, .ckpt, .bin)"
        )
    # a gem3d stage 0 trained adversarially also holds its discriminator: training's, not the codec's
    weights = {name: t for name, t in weights.items() if not name.startswith("discriminator.")}
    return {name if name.startswith("net.") or name == "scale" else f"net.{name}": t for name, t in weights.items()}


def load_codec_weights(codec: SliceAutoencoder, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Load an autoencoder's weights (``scale`` optional: 1.0 when absent), one line on a mismatch."""
    tensors = dict(weights)
    tensors.setdefault("scale", torch.ones(()))
    load_weights(codec, tensors, source)
