"""Bi-directional overlapped volume sampling (GEM-3D, section "volumetric generation").

A volume of D slices is generated window by window in the model grid:

1. The first window (W slices) starts at the start position s (moved down if s + W > D) and is
   generated from pure noise, conditioned on its mask slices and the informed slice.
2. Upward windows start at s + k(W-h); downward windows at s - k(W-h). The last window of
   each direction is aligned to the volume's end (D - W, or 0), and carries every slice already
   generated inside it, each at its true position (so it may carry more than h).
3. A window's carried slices are imposed by replacement inpainting: before every sampler step
   they are noised to *that step's* timestep (``Sampler.noisy``) and written over the window's
   state. (The reference implementation indexed the 1000-step alpha-bar table with
   the DDIM step index, so its carried slices were nearly clean from the start.)
4. The up and down chains are independent after the first window, so window k of both chains,
   for every volume of a batch, is denoised in one network call. Each volume has its own seeded
   generator on the model's device for its initial noise, inpainting noise and (eta > 0) DDIM
   noise: the same seed gives the same bytes on the same device, whatever the volume's
   batch-mates (a CPU and a GPU draw different streams from one seed).
5. A latent model (``model.latent``) runs steps 1-4 on latents ``[C, D, H/f, W/f]``: the
   informed slice is encoded once, carried slices are latents, and the volume is decoded slice
   by slice at the end, ``decode_batch`` slices per call (``gem3d.autoencoder.decode_slices``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gem3d.autoencoder import DEFAULT_SLICE_BATCH, decode_slices, encode_slices
from gem3d.diffusion import Sampler
from gem3d.networks import InformedSliceGenerator, SliceDenoiser

OnProgress = Callable[[int, int, int], None]
"""``on_progress(volume_index, windows_done, windows_total)``."""


@dataclass(frozen=True)
class Window:
    """Slices ``start .. start+length-1``; ``carried`` are absolute indices already generated."""

    start: int
    length: int
    carried: tuple[int, ...] = ()

    @property
    def stop(self) -> int:
        return self.start + self.length


def plan_windows(depth: int, start: int, window: int, overlap: int) -> list[list[Window]]:
    """The windows of one volume, grouped in rounds that can run in parallel.

    Args:
        depth: D >= 1 slices.
        start: the start position s (clamped to the volume).
        window: W; a volume with D < W is one window of D slices.
        overlap: h, slices carried between consecutive windows (at most W-1).
    Returns:
        ``rounds[0]`` is the first window; ``rounds[k]`` holds the k-th upward and downward window.
    """
    if depth < 1:
        raise ValueError(f"a volume needs at least one slice, got depth {depth}")
    length = min(window, depth)
    carry = min(overlap, length - 1)
    stride = length - carry
    first = min(max(start, 0), depth - length)
    up: list[Window] = []
    lo, generated_stop = first, first + length
    while generated_stop < depth:
        lo = min(lo + stride, depth - length)
        up.append(Window(lo, length, tuple(range(lo, generated_stop))))
        generated_stop = lo + length
    down: list[Window] = []
    lo, generated_start = first, first
    while generated_start > 0:
        lo = max(lo - stride, 0)
        down.append(Window(lo, length, tuple(range(generated_start, lo + length))))
        generated_start = lo
    rounds = [[Window(first, length)]]
    for k in range(max(len(up), len(down))):
        rounds.append([chain[k] for chain in (up, down) if k < len(chain)])
    return rounds


@dataclass(frozen=True)
class InformedSlice:
    """The appearance prior of a volume, in the model grid.

    Attributes:
        image: ``[H, W]`` intensities in [-1, 1].
        mask: ``[H, W]`` its label ids, or None when unknown (a user's file): the target mask's
            slice at the start position is then used where the network wants the informed mask.
        source: ``real``, ``copy``, ``file`` or ``generate``.
        provenance: where it came from (case, slice index, file), recorded with every output.
    """

    image: np.ndarray
    mask: np.ndarray | None
    source: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleRequest:
    """One volume to generate.

    Attributes:
        mask: ``[D, H, W]`` label ids in the model grid.
        informed: the informed slice.
        start: the start position s.
        seed: seeds this volume's noise.
    """

    mask: np.ndarray
    informed: InformedSlice
    start: int
    seed: int


def default_start(mask: np.ndarray) -> int:
    """The middle of the labelled slices of ``mask`` ``[D, H, W]`` (the middle slice if empty)."""
    labelled = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if labelled.size == 0:
        return mask.shape[0] // 2
    return int((labelled[0] + labelled[-1]) // 2)


@torch.no_grad()
def sample_volumes(
    model: SliceDenoiser,
    sampler: Sampler,
    requests: Sequence[SampleRequest],
    window: int,
    overlap: int,
    batch_volumes: int = 4,
    on_progress: OnProgress | None = None,
) -> list[np.ndarray]:
    """Generate one volume per request.

    Args:
        model: the (inflated) denoiser, in eval mode, on its device.
        sampler: the reverse process (timesteps, eta).
        window: W; overlap: h.
        batch_volumes: volumes whose windows share a network batch.
    Returns:
        ``[D, H, W]`` float32 volumes in [-1, 1], in the order of ``requests``.
    """
    outputs: list[np.ndarray] = []
    for first in range(0, len(requests), batch_volumes):
        chunk = requests[first : first + batch_volumes]
        outputs += _sample_chunk(model, sampler, chunk, first, window, overlap, on_progress)
    return outputs


def _sample_chunk(
    model: SliceDenoiser,
    sampler: Sampler,
    requests: Sequence[SampleRequest],
    offset: int,
    window: int,
    overlap: int,
    on_progress: OnProgress | None,
) -> list[np.ndarray]:
    device = next(model.parameters()).device
    plans = [plan_windows(r.mask.shape[0], r.start, window, overlap) for r in requests]
    totals = [sum(len(round_) for round_ in plan) for plan in plans]
    done = [0] * len(requests)
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    channels, f = model.image_channels, model.factor
    # each [C, D, h, w]: the slices (C = 1) or, for a latent model, their latents
    volumes = [torch.zeros((channels, r.mask.shape[0], r.mask.shape[1] // f, r.mask.shape[2] // f)) for r in requests]
    # Masks stay uint8 and become int64 one window at a time: peak memory stays flat in depth.
    masks = [torch.from_numpy(np.ascontiguousarray(r.mask, dtype=np.uint8)) for r in requests]
    informed = [torch.from_numpy(r.informed.image.astype(np.float32))[None] for r in requests]  # each [1, H, W]
    if model.codec is not None:
        encoded = encode_slices(model.codec, torch.stack(informed).to(device)).cpu()  # [N, C, h, w]
        informed = list(encoded)
    informed_masks = [
        torch.from_numpy((r.informed.mask if r.informed.mask is not None else r.mask[r.start]).astype(np.int64))
        for r in requests
    ]
    for k in range(max(len(plan) for plan in plans)):
        jobs = [(i, w) for i, plan in enumerate(plans) if k < len(plan) for w in plan[k]]
        for length in sorted({w.length for _, w in jobs}):
            group = [(i, w) for i, w in jobs if w.length == length]
            result = _denoise_windows(
                model,
                sampler,
                known=torch.stack([volumes[i][:, w.start : w.stop] for i, w in group]),
                carried=[[z - w.start for z in w.carried] for _, w in group],
                mask=torch.stack([masks[i][w.start : w.stop] for i, w in group]).long(),
                informed=torch.stack([informed[i] for i, _ in group]),
                informed_mask=torch.stack([informed_masks[i] for i, _ in group]),
                generators=[generators[i] for i, _ in group],
                device=device,
            )
            for (i, w), slices in zip(group, result, strict=True):
                volumes[i][:, w.start : w.stop] = slices
                done[i] += 1
                if on_progress is not None:
                    on_progress(offset + i, done[i], totals[i])
    if model.codec is None:
        return [v[0].numpy() for v in volumes]
    return [_decoded(model, v, device) for v in volumes]


def _decoded(model: SliceDenoiser, latents: torch.Tensor, device: torch.device) -> np.ndarray:
    """``[C, D, h, w]`` latents -> ``[D, H, W]`` float32 slices in [-1, 1], decoded in bounded batches."""
    assert model.codec is not None
    slices = latents.movedim(1, 0)  # [D, C, h, w]
    out = [
        decode_slices(model.codec, slices[i : i + DEFAULT_SLICE_BATCH].to(device)).clamp(-1.0, 1.0).cpu()
        for i in range(0, slices.shape[0], DEFAULT_SLICE_BATCH)
    ]
    return torch.cat(out)[:, 0].numpy()


def _denoise_windows(
    model: SliceDenoiser,
    sampler: Sampler,
    known: torch.Tensor,
    carried: list[list[int]],
    mask: torch.Tensor,
    informed: torch.Tensor,
    informed_mask: torch.Tensor,
    generators: list[torch.Generator],
    device: torch.device,
) -> torch.Tensor:
    """Run the sampler loop on N windows at once, inpainting their carried slices.

    Args:
        known: ``[N, C, L, h, w]`` already generated slices or latents (valid where ``carried``).
        carried: per window, the window-relative indices of carried slices.
        mask: ``[N, L, H, W]`` full resolution; informed: ``[N, C, h, w]``; informed_mask: ``[N, H, W]``.
    Returns:
        ``[N, C, L, h, w]`` on the CPU, carried slices exactly as given (pixels clamped to [-1, 1]).
    """
    shape = tuple(known.shape[1:])
    carry = torch.zeros(known.shape, dtype=torch.bool)
    for n, indices in enumerate(carried):
        carry[n, :, indices] = True
    # Noise is drawn on the device from each volume's own generator: no host copy per step.
    x = seeded_noise(generators, shape, device)
    cond = model.condition(mask.to(device), informed.to(device), informed_mask.to(device))
    known_d, carry_d = known.to(device), carry.to(device)
    any_carried = any(carried)
    for index, t in enumerate(sampler.timesteps):
        if any_carried:
            # 1. replacement inpainting: carried slices noised to this step's own timestep
            x = torch.where(carry_d, sampler.noisy(known_d, seeded_noise(generators, shape, device), index), x)
        # 2. predict and step to the noise level of the next timestep
        timesteps = torch.full((known.shape[0],), t, dtype=torch.long, device=device)
        output = model(x, timesteps, cond)
        x = sampler.step(output, index, x, seeded_noise(generators, shape, device) if sampler.stochastic else None)
    x = torch.where(carry_d, known_d, x)
    return (x if model.codec is not None else x.clamp(-1.0, 1.0)).cpu()


def seeded_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[N, *shape]`` unit Gaussian noise on ``device``, row n from ``generators[n]`` (on that device)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


@torch.no_grad()
def generate_informed_slices(
    model: InformedSliceGenerator,
    sampler: Sampler,
    positions: Sequence[float],
    masks: Sequence[np.ndarray] | None,
    seeds: Sequence[int],
    size: tuple[int, int],
) -> list[np.ndarray]:
    """Sample informed slices from the generator.

    Args:
        positions: normalised slice positions in [0, 1].
        masks: ``[H, W]`` mask slices (required when the generator is mask-conditioned).
        seeds: one per slice.
        size: ``(H, W)`` of the slices.
    Returns:
        ``[H, W]`` float32 slices in [-1, 1] (a latent generator's decoded).
    """
    device = next(model.parameters()).device
    if model.cfg.condition_on_mask and masks is None:
        raise ValueError("this informed-slice generator is conditioned on the mask slice; pass masks")
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    shape = (model.image_channels, size[0] // model.factor, size[1] // model.factor)
    x = seeded_noise(generators, shape, device)
    position = torch.tensor(list(positions), dtype=torch.float32, device=device)
    mask = None
    if masks is not None and model.cfg.condition_on_mask:
        mask = torch.from_numpy(np.stack(masks).astype(np.int64)).to(device)
    for index, t in enumerate(sampler.timesteps):
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        output = model(x, timesteps, position, mask)
        x = sampler.step(output, index, x, seeded_noise(generators, shape, device) if sampler.stochastic else None)
    if model.codec is not None:
        x = decode_slices(model.codec, x)
    return [s[0].clamp(-1.0, 1.0).cpu().numpy() for s in x]
