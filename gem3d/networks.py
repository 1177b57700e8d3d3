"""The GEM-3D networks, built from MONAI's ``DiffusionModelUNet``.

* ``SliceDenoiser``: a 2D UNet applied to every slice of a window. Conditioning is by channel
  concatenation of [noisy slice, mask slice, informed slice, (informed slice's mask)].
  ``inflate()`` turns it into the stage-2 volumetric model by adding slice-axis layers after
  each spatial residual block (1D conv) and each spatial attention block (1D self-attention),
  initialised so the inflated network computes exactly what the 2D one did. The inflated network
  runs through ``inflated_unet_forward``, which hands the window length to every slice-axis layer
  as an argument (MONAI's blocks pass only the tensor and the time embedding).
* ``InformedSliceGenerator``: a 2D diffusion model for the informed slice, conditioned on the
  normalised slice position (class embedding over position bins) and optionally the mask slice.

Mask encoding (``ModelConfig.mask_encoding``), for label ids 0..L-1 with 0 the background:
* ``onehot``: L-1 channels, channel k-1 is 1.0 where label == k, else 0.0.
* ``scaled``: 1 channel, 2 * label / (L-1) - 1, in [-1, 1].

Latent models (``model.latent``): both networks hold the frozen stage-0 autoencoder as ``codec``
and work on ``C`` latent channels at 1/f of the slice size (``gem3d.autoencoder``); the encoded
mask is averaged over each latent pixel's f x f area (``area_downsample``), never encoded by the
image autoencoder. Pixel models have ``codec = None``, one image channel and f = 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn

from gem3d.autoencoder import SliceAutoencoder, area_downsample
from gem3d.config import AutoencoderConfig, InformedModelConfig, ModelConfig, UNetConfig


def mask_channels(num_labels: int, encoding: str) -> int:
    """Channels ``encode_mask`` produces."""
    if encoding == "onehot":
        return num_labels - 1
    if encoding == "scaled":
        return 1
    raise ValueError(f"unknown mask encoding '{encoding}' (known: onehot, scaled)")


def encode_mask(label: torch.Tensor, num_labels: int, encoding: str) -> torch.Tensor:
    """Encode an integer label map as network input channels.

    Args:
        label: ``[B, *S]`` integer label ids in 0..num_labels-1 (S = ``(H, W)`` or ``(D, H, W)``).
    Returns:
        ``[B, K, *S]`` float, K = ``mask_channels(num_labels, encoding)``.
    """
    if encoding == "onehot":
        onehot = F.one_hot(label.long(), num_labels)[..., 1:]  # [B, *S, L-1]
        return onehot.movedim(-1, 1).float()
    if encoding == "scaled":
        return (2.0 * label.float() / (num_labels - 1) - 1.0).unsqueeze(1)
    raise ValueError(f"unknown mask encoding '{encoding}' (known: onehot, scaled)")


def condition_channels(cfg: ModelConfig, num_labels: int, image_channels: int = 1) -> int:
    """Channels of the denoiser's condition: mask (+ informed slice's ``image_channels`` (+ its mask))."""
    per_mask = mask_channels(num_labels, cfg.mask_encoding)
    if not cfg.informed_slice:
        return per_mask
    return per_mask + image_channels + (per_mask if cfg.informed_mask else 0)


def build_condition(
    mask: torch.Tensor,
    informed: torch.Tensor,
    informed_mask: torch.Tensor,
    num_labels: int,
    cfg: ModelConfig,
    factor: int = 1,
) -> torch.Tensor:
    """Stack the denoiser's condition for a window.

    Args:
        mask: ``[B, D, H, W]`` label ids of the window's slices (full resolution).
        informed: ``[B, Ci, H/f, W/f]`` the informed slice: its latent (latent models) or, for a
            pixel model (f = 1), ``[B, 1, H, W]`` or ``[B, H, W]`` intensities in [-1, 1].
        informed_mask: ``[B, H, W]`` label ids of the informed slice.
        factor: f, the latent's downsampling (1: pixel space); masks are area-averaged by it.
    Returns:
        ``[B, Cc, D, H/f, W/f]``: encoded mask per slice, then the informed slice (and its encoded
        mask) repeated along D; only the encoded mask when ``cfg.informed_slice`` is off.
    """
    depth = mask.shape[1]
    if informed.ndim == 3:
        informed = informed.unsqueeze(1)
    encoded_mask = area_downsample(encode_mask(mask, num_labels, cfg.mask_encoding), factor).to(informed.dtype)
    if not cfg.informed_slice:  # the mask-only baseline
        return encoded_mask
    parts = [encoded_mask, informed.unsqueeze(2).expand(-1, -1, depth, -1, -1)]
    if cfg.informed_mask:
        encoded = area_downsample(encode_mask(informed_mask, num_labels, cfg.mask_encoding), factor)  # [B, K, h, w]
        parts.append(encoded.unsqueeze(2).expand(-1, -1, depth, -1, -1))
    return torch.cat([part.to(informed.dtype) for part in parts], dim=1)


def _to_sequences(h: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[B*D, C, *S]`` -> ``[B*prod(S), C, D]``: one sequence along the slice axis per pixel."""
    channels = h.shape[1]
    seq = h.reshape(-1, num_frames, *h.shape[1:]).movedim(1, -1)  # [B, C, *S, D]
    return seq.movedim(1, -2).reshape(-1, channels, num_frames)


def _from_sequences(seq: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``_to_sequences`` back to ``shape`` = ``[B*D, C, *S]``."""
    channels, spatial, num_frames = shape[1], shape[2:], seq.shape[-1]
    out = seq.reshape(-1, *spatial, channels, num_frames).movedim(-2, 1)  # [B, C, *S, D]
    return out.movedim(-1, 1).reshape(shape)


class SliceAxisConv(nn.Module):
    """A 1D convolution across slices, initialised to the identity.

    Input and output ``[B*D, C, H, W]``, with D = ``frames``, the window length.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, bias=True)
        identity = torch.zeros_like(self.conv.weight)
        identity[:, :, kernel_size // 2] = torch.eye(channels)
        self.conv.weight = nn.Parameter(identity)
        self.conv.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        return _from_sequences(self.conv(_to_sequences(h, frames)), h.shape)


class SliceAxisAttention(nn.Module):
    """Self-attention across slices (MONAI ``SpatialAttentionBlock`` on 1D sequences).

    Its output projection starts at zero, so with its residual it is the identity at
    initialisation. Input and output ``[B*D, C, H, W]``, with D = ``frames``.
    """

    def __init__(self, channels: int, num_head_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.attention = SpatialAttentionBlock(
            spatial_dims=1, num_channels=channels, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups
        )
        out_proj = self.attention.attn.out_proj
        assert isinstance(out_proj, nn.Linear)
        nn.init.zeros_(out_proj.weight)
        nn.init.zeros_(out_proj.bias)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        return _from_sequences(self.attention(_to_sequences(h, frames)), h.shape)


class InflatedResnetBlock(nn.Module):
    """A stage-1 spatial residual block followed by a slice-axis conv."""

    def __init__(self, spatial: DiffusionUNetResnetBlock, kernel_size: int) -> None:
        super().__init__()
        self.spatial = spatial
        self.slice_conv = SliceAxisConv(spatial.out_channels, kernel_size)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        return self.slice_conv(self.spatial(x, emb), frames)


class InflatedAttentionBlock(nn.Module):
    """A stage-1 spatial attention block followed by slice-axis attention."""

    def __init__(self, spatial: SpatialAttentionBlock, num_head_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.spatial = spatial
        self.slice_attn = SliceAxisAttention(spatial.norm.num_channels, num_head_channels, norm_num_groups)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.slice_attn(self.spatial(x), frames)


def _resnet(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
    return block(h, emb, frames) if isinstance(block, InflatedResnetBlock) else block(h, emb)


def _attention(block: nn.Module, h: torch.Tensor, frames: int) -> torch.Tensor:
    return (block(h, frames) if isinstance(block, InflatedAttentionBlock) else block(h)).contiguous()


def inflated_unet_forward(
    unet: DiffusionModelUNet, x: torch.Tensor, timesteps: torch.Tensor, frames: int
) -> torch.Tensor:
    """MONAI's ``DiffusionModelUNet.forward`` for a stage-2 network, the window length an argument.

    The same modules in the same order as MONAI's forward (no cross-attention, class labels or
    ControlNet residuals: the slice denoiser uses none), except that every inflated layer is
    given ``frames``. MONAI's blocks pass nothing but the tensor and the time embedding down, so
    this walks their layers itself: no state is written, concurrent calls each have their own D,
    and ``torch.compile`` traces the whole network as one graph. A fresh inflation computes exactly
    MONAI's forward (``tests/test_networks.py`` checks it).

    Args:
        x: ``[B*D, C, H, W]`` the window's slices; timesteps: ``[B*D]``; frames: D.
    Returns:
        ``[B*D, C_out, H, W]``.
    """
    net: Any = unet  # MONAI's submodules, typed as nn.Module | Tensor by torch's stubs
    emb = net.time_embed(get_timestep_embedding(timesteps, net.block_out_channels[0]).to(dtype=x.dtype))
    h = net.conv_in(x)
    skips = [h]
    for block in net.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions, strict=True):
            h = _resnet(resnet, h, emb, frames)
            if attention is not None:
                h = _attention(attention, h, frames)
            skips.append(h)
        if block.downsampler is not None:
            h = block.downsampler(h, emb)
            skips.append(h)
    h = _resnet(net.middle_block.resnet_1, h, emb, frames)
    h = _attention(net.middle_block.attention, h, frames)
    h = _resnet(net.middle_block.resnet_2, h, emb, frames)
    for block in net.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions, strict=True):
            h = _resnet(resnet, torch.cat([h, skips.pop()], dim=1), emb, frames)
            if attention is not None:
                h = _attention(attention, h, frames)
        if block.upsampler is not None:
            h = block.upsampler(h, emb)
    output: torch.Tensor = net.out(h)
    return output


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """bf16 (or ``dtype``) autocast on ``x``'s device, or nothing when ``dtype`` is None (``gem3d.accel``)."""
    return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()


def _unet(
    in_channels: int, cfg: UNetConfig, num_class_embeds: int | None = None, out_channels: int = 1
) -> DiffusionModelUNet:
    """The 2D ``DiffusionModelUNet`` both networks are built on (``UNetConfig`` has checked its shape)."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        num_class_embeds=num_class_embeds,
    )


class _ImageSpace:
    """What a network's image (or latent) input looks like, from its ``codec`` (None: pixel space)."""

    codec: SliceAutoencoder | None

    @property
    def image_channels(self) -> int:
        """C: 1 for a pixel model, the latent channels for a latent one."""
        return 1 if self.codec is None else self.codec.latent_channels

    @property
    def factor(self) -> int:
        """f: slice pixels per latent pixel along a side (1 for a pixel model)."""
        return 1 if self.codec is None else self.codec.factor


class WindowDenoiser(nn.Module, ABC):
    """A conditional denoiser of windows ``[B, C, D, h, w]``: what ``gem3d.training`` trains on windows.

    Subclasses build their condition from a window's masks (``condition``) and predict the
    diffusion target from ``forward(x, t, cond)``. ``codec``: a latent model's frozen slice
    autoencoder (None: pixel space), which encodes the windows before they are noised.
    """

    num_labels: int
    codec: SliceAutoencoder | None  # set by every subclass (a class default would hide a registered module)

    @abstractmethod
    def condition(self, mask: torch.Tensor, informed: torch.Tensor, informed_mask: torch.Tensor) -> torch.Tensor:
        """``[B, Cc, D, h, w]``: the condition of windows with ``mask`` ``[B, D, H, W]`` label ids,
        ``informed`` ``[B, Ci, h, w]`` (or ``[B, H, W]``) and ``informed_mask`` ``[B, H, W]``."""


class SliceDenoiser(_ImageSpace, WindowDenoiser):
    """GEM-3D's conditional denoiser over a window of slices.

    Stage 1 (``inflated = False``) treats each slice independently; stage 2 (after ``inflate()``)
    mixes information along the slice axis. Both take the same tensors.

    ``compute_dtype``: the autocast dtype of the forward (``gem3d.accel``; None: the weights' fp32).
    ``codec``: the frozen slice autoencoder of a latent model (``codec_cfg`` given), else None.
    """

    def __init__(self, cfg: ModelConfig, num_labels: int, codec_cfg: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_labels = num_labels
        self.codec = _codec(codec_cfg)
        channels = self.image_channels
        self.unet = _unet(channels + condition_channels(cfg, num_labels, channels), cfg, out_channels=channels)
        self.inflated = False
        self.compute_dtype: torch.dtype | None = None

    def inflate(self, seed: int = 0) -> None:
        """Add slice-axis layers (stage 2), on the device of the others; a second call is refused.

        Their random initialisation (the slice-axis attention's projections) comes from ``seed``;
        the global RNG is left untouched, so the same seed gives the same stage-2 network.
        """
        if self.inflated:
            raise RuntimeError("SliceDenoiser is already inflated")
        device = next(self.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _inflate_children(self.unet, self.cfg)
        self.to(device)
        self.inflated = True

    def condition(self, mask: torch.Tensor, informed: torch.Tensor, informed_mask: torch.Tensor) -> torch.Tensor:
        """``build_condition`` with this network's labels, model config and latent factor."""
        return build_condition(mask, informed, informed_mask, self.num_labels, self.cfg, self.factor)

    def slice_axis_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers ``inflate()`` added."""
        return [p for name, p in self.named_parameters() if ".slice_conv." in name or ".slice_attn." in name]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict the diffusion target for every slice of a window.

        Args:
            x: ``[B, C, D, h, w]`` noisy slices (C = 1, h = H for a pixel model; latents otherwise).
            t: ``[B, D]`` per-slice timesteps, or ``[B]`` one per window.
            cond: ``[B, Cc, D, h, w]`` from ``build_condition``.
        Returns:
            ``[B, C, D, h, w]`` fp32 (also under ``compute_dtype``).
        """
        batch, depth = x.shape[0], x.shape[2]
        if t.dim() == 1:
            t = t[:, None].expand(batch, depth)
        slices = torch.cat([x, cond], dim=1).movedim(2, 1)  # [B, D, C, H, W]
        slices = slices.reshape(batch * depth, *slices.shape[2:])  # [B*D, C, H, W]
        with _autocast(x, self.compute_dtype):
            if self.inflated:
                out = inflated_unet_forward(self.unet, slices, t.reshape(batch * depth), depth)  # [B*D, C, h, w]
            else:
                out = self.unet(slices, t.reshape(batch * depth))
        return out.float().reshape(batch, depth, *out.shape[1:]).movedim(1, 2)


def _codec(cfg: AutoencoderConfig | None) -> SliceAutoencoder | None:
    """The frozen autoencoder of a latent network (its weights are loaded by the caller), or None."""
    if cfg is None:
        return None
    codec = SliceAutoencoder(cfg)
    codec.requires_grad_(False)
    return codec


def _inflate_children(module: nn.Module, cfg: ModelConfig) -> None:
    for name, child in module.named_children():
        if isinstance(child, DiffusionUNetResnetBlock):
            setattr(module, name, InflatedResnetBlock(child, cfg.temporal_kernel))
        elif isinstance(child, SpatialAttentionBlock) and cfg.temporal_attention:
            setattr(module, name, InflatedAttentionBlock(child, cfg.num_head_channels, cfg.norm_num_groups))
        else:
            _inflate_children(child, cfg)


class InformedSliceGenerator(_ImageSpace, nn.Module):
    """2D diffusion model of the informed slice at a normalised position, optionally given its mask."""

    def __init__(
        self,
        cfg: InformedModelConfig,
        num_labels: int,
        mask_encoding: str,
        codec_cfg: AutoencoderConfig | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_labels = num_labels
        self.mask_encoding = mask_encoding
        self.codec = _codec(codec_cfg)  # as SliceDenoiser's
        cond = mask_channels(num_labels, mask_encoding) if cfg.condition_on_mask else 0
        channels = self.image_channels
        self.unet = _unet(channels + cond, cfg, num_class_embeds=cfg.position_bins, out_channels=channels)
        self.compute_dtype: torch.dtype | None = None  # as SliceDenoiser's

    def position_bin(self, position: torch.Tensor) -> torch.Tensor:
        """``[B]`` positions in [0, 1] -> ``[B]`` class ids in 0..position_bins-1."""
        bins = self.cfg.position_bins
        return (position.clamp(0, 1) * (bins - 1)).round().long()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Predict the diffusion target of informed slices.

        Args:
            x: ``[B, C, h, w]`` noisy slices (or latents, ``SliceDenoiser.forward``).
            t: ``[B]`` timesteps.
            position: ``[B]`` slice index / (D - 1), in [0, 1].
            mask: ``[B, H, W]`` label ids at full resolution, required when ``condition_on_mask``.
        Returns:
            ``[B, C, h, w]`` fp32 (also under ``compute_dtype``).
        """
        inputs = x
        if self.cfg.condition_on_mask:
            if mask is None:
                raise ValueError("this informed-slice generator is conditioned on the mask slice; pass mask")
            encoded = area_downsample(encode_mask(mask, self.num_labels, self.mask_encoding), self.factor)
            inputs = torch.cat([x, encoded.to(x.dtype)], dim=1)
        with _autocast(x, self.compute_dtype):
            out = self.unet(inputs, t, class_labels=self.position_bin(position))
        return out.float()
