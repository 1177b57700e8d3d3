"""Training loops for the GEM-3D stages: plain functions, no framework inside.

* ``autoencoder`` (stage 0, latent models only): the slice autoencoder on single slices
  (``gem3d.autoencoder``); a reconstruction loss, no noising.
* ``slice`` (stage 1): windows of W slices; every slice is its own sample with its own
  timestep; the informed slice comes from the same window.
* ``volume`` (stage 2): the inflated network on windows, one timestep per window drawn as
  ``t = T * u**p`` (p > 1 favours small t); by default only the slice-axis layers train.
* ``informed``: the informed-slice generator on single slices with their positions.

In a latent model the clean windows and informed slices are encoded by its frozen ``codec``
right after they are drawn (``latent_batch``), and everything after works on latents; masks stay
label ids and are area-averaged to the latent size inside the networks.

The centralized CLI, the Flower client, the benchmarks and the evaluation's full-3D baseline (a
``WindowDenoiser`` on whole padded volumes) all call ``train``. A DP wrapper
reuses ``draw_inputs`` and ``per_sample_loss`` and replaces only the batch sampling and backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gem3d import distributed
from gem3d.autoencoder import SliceAutoencoder, encode_slices
from gem3d.config import Config, TrainConfig
from gem3d.data.loader import StepBatches, step_batches, step_seed
from gem3d.data.volume import Volume
from gem3d.data.windows import SliceBatch, WindowBatch, WindowSource
from gem3d.diffusion import NoiseProcess, noise_process
from gem3d.networks import InformedSliceGenerator, SliceDenoiser, WindowDenoiser

Stage = Literal["autoencoder", "slice", "volume", "informed"]
STAGES: tuple[Stage, ...] = ("autoencoder", "slice", "volume", "informed")
DENOISING_STAGES: tuple[Stage, ...] = ("slice", "volume", "informed")
OnStep = Callable[[dict[str, float]], None]


@dataclass
class TrainState:
    """Everything that changes during training; saved whole for a bit-exact resume.

    The randomness of step n is a function of ``(seed, n)`` (``gem3d.data.loader.step_seed``), so
    the step counter is the only random state there is to save.
    """

    model: nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    seed: int
    step: int = 0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class ExponentialAverage(AveragedModel):
    """An EMA of a model's parameters (its buffers copied), updated without waiting for the device.

    ``AveragedModel``'s own update copies its update count to the device at every call, which on
    CUDA makes the host wait for the queued step (a host synchronisation per training step). Here
    the count stays a host tensor (``n_averaged``, saved in checkpoints as before) and the decay a
    Python float, so an update only queues two ``_foreach`` kernels.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        super().__init__(model)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [p.detach() for p in self.module.parameters()]
        current = [p.detach().to(a.device) for p, a in zip(model.parameters(), averaged, strict=True)]
        n = int(self.n_averaged)  # updates so far (a CPU tensor: no device wait)
        if n == 0:
            torch._foreach_copy_(averaged, current)
        else:
            decay = min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.n_averaged += 1


def ema_copy(model: nn.Module, decay: float, warmup: bool = False) -> ExponentialAverage:
    """An EMA of ``model``'s parameters: each ``update_parameters`` does ema = d ema + (1 - d) model.

    The first update copies the model. With ``warmup``, update n (n >= 1 updates so far) uses
    d = min(decay, (1 + n) / (10 + n)), so a short history (a few federated rounds) is not
    dominated by its first, least trained, weights.
    """
    return ExponentialAverage(model, decay, warmup)


def new_state(model: nn.Module, cfg: TrainConfig, seed: int | None = None) -> TrainState:
    """AdamW over the model's trainable parameters, an EMA copy (warming up with ``cfg.ema_warmup``)
    and the run's seed (``cfg.seed`` unless given).

    Which parameters train is the caller's choice (``requires_grad``), e.g. stage 2 freezes the base.
    """
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = ema_copy(model, cfg.ema_decay, cfg.ema_warmup)
    return TrainState(model=model, ema=ema, optimizer=optimizer, seed=cfg.seed if seed is None else seed)


def freeze_for_stage(model: nn.Module, stage: Stage, train_all: bool) -> None:
    """Stage 2 trains only the slice-axis layers unless ``train_all``; other stages train everything
    but a latent network's ``codec``, which stays frozen (it is stage 0's)."""
    if stage == "volume" and not train_all:
        assert isinstance(model, SliceDenoiser)
        model.requires_grad_(False)
        for parameter in model.slice_axis_parameters():
            parameter.requires_grad_(True)
    else:
        model.requires_grad_(True)
    codec = getattr(model, "codec", None)
    if isinstance(codec, SliceAutoencoder) and not isinstance(model, SliceAutoencoder):
        codec.requires_grad_(False)


def travelling_names(model: nn.Module) -> list[str]:
    """State-dict names of the trainable parameters (``freeze_for_stage``): what crosses the network in a round."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [name for name in model.state_dict() if name in trainable]


@dataclass(frozen=True)
class DenoisingInputs:
    """One noised batch: the network's inputs and what it must predict.

    Attributes:
        noisy: ``[B, 1, D, H, W]`` (windows) or ``[B, 1, H, W]`` (slices).
        t: ``[B, D]`` or ``[B]`` timesteps.
        cond: ``[B, Cc, D, H, W]`` for windows; ``None`` for slices (see ``position``/``mask``).
        target: same shape as ``noisy``.
        position: ``[B]`` slice positions (informed generator only).
        mask: ``[B, H, W]`` mask slices (informed generator conditioned on the mask).
        weight: the shape of ``t``: per-sample loss weights (``diffusion.loss_weighting``), or None.
        noise: ``[B, C, h, w]`` the autoencoder stage's reparameterisation noise (its ``noisy`` and
            ``target`` are the clean slices, ``t`` zeros), else None.
    """

    noisy: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    target: torch.Tensor
    position: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def latent_batch(model: nn.Module, batch: WindowBatch | SliceBatch) -> WindowBatch | SliceBatch:
    """``batch`` with its images encoded by ``model``'s frozen codec (unchanged for a pixel model).

    Windows ``[B, 1, D, H, W]`` become ``[B, C, D, h, w]`` and informed slices ``[B, H, W]``
    become ``[B, C, h, w]``; slices ``[B, 1, H, W]`` become ``[B, C, h, w]``. Masks are kept.
    """
    codec = getattr(model, "codec", None)
    if not isinstance(codec, SliceAutoencoder):
        return batch
    if isinstance(batch, SliceBatch):
        return replace(batch, image=encode_slices(codec, batch.image))
    return replace(
        batch, image=encode_slices(codec, batch.image), informed=encode_slices(codec, batch.informed.unsqueeze(1))
    )


def autoencoder_inputs(model: SliceAutoencoder, batch: SliceBatch, generator: torch.Generator) -> DenoisingInputs:
    """Stage 0's inputs: the clean slices and their reparameterisation noise, drawn from ``generator``."""
    image = batch.image
    size = (image.shape[0], model.latent_channels, image.shape[2] // model.factor, image.shape[3] // model.factor)
    noise = torch.randn(size, generator=generator, device=generator.device).to(image.device)
    t = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
    return DenoisingInputs(noisy=image, t=t, cond=None, target=image, noise=noise)


def window_inputs(
    model: WindowDenoiser,
    process: NoiseProcess,
    batch: WindowBatch,
    generator: torch.Generator,
    per_slice_t: bool,
    t_power: float = 1.0,
    timestep: int | None = None,
) -> DenoisingInputs:
    """Noise a batch of windows (a latent model's are encoded first, ``latent_batch``).

    Args:
        batch: windows with ``image`` ``[B, 1, D, H, W]``.
        per_slice_t: stage 1 draws a timestep per slice ``[B, D]``; stage 2 one per window.
        generator: draws the timesteps and noise, on its own device (then moved to the batch's).
        timestep: noise every slice to this timestep instead of drawing one (the audit's
            membership-inference attack, ``privacy.audit``); training leaves it ``None``.
    """
    encoded = latent_batch(model, batch)
    assert isinstance(encoded, WindowBatch)
    batch = encoded
    batch_size, depth = batch.image.shape[0], batch.image.shape[2]
    device = batch.image.device
    if timestep is not None:
        t = torch.full((batch_size, depth), timestep, dtype=torch.long)
    elif per_slice_t:
        t = process.draw_timesteps((batch_size, depth), generator, t_power)
    else:
        t = process.draw_timesteps((batch_size,), generator, t_power)[:, None].expand(batch_size, depth)
    noise = torch.randn(batch.image.shape, generator=generator, device=generator.device).to(device)
    t = t.to(device)
    # [B, D, 1, H, W] so the per-slice timesteps [B, D] are the leading dims.
    x0_slices, noise_slices = batch.image.transpose(1, 2), noise.transpose(1, 2)
    noisy = process.add_noise(x0_slices, noise_slices, t).transpose(1, 2)
    target = process.target(x0_slices, noise_slices, t).transpose(1, 2)
    cond = model.condition(batch.mask, batch.informed, batch.informed_mask)
    return DenoisingInputs(noisy=noisy, t=t, cond=cond, target=target, weight=process.loss_weight(t))


def slice_inputs(
    model: InformedSliceGenerator,
    process: NoiseProcess,
    batch: SliceBatch,
    generator: torch.Generator,
    timestep: int | None = None,
) -> DenoisingInputs:
    """Noise a batch of single slices (a latent model's encoded first) for the informed-slice generator
    (at ``timestep``, if given)."""
    encoded = latent_batch(model, batch)
    assert isinstance(encoded, SliceBatch)
    batch = encoded
    device = batch.image.device
    if timestep is not None:
        t = torch.full((len(batch),), timestep, dtype=torch.long, device=device)
    else:
        t = process.draw_timesteps((len(batch),), generator).to(device)
    noise = torch.randn(batch.image.shape, generator=generator, device=generator.device).to(device)
    return DenoisingInputs(
        noisy=process.add_noise(batch.image, noise, t),
        t=t,
        cond=None,
        target=process.target(batch.image, noise, t),
        position=batch.position,
        mask=batch.mask if model.cfg.condition_on_mask else None,
        weight=process.loss_weight(t),
    )


def contrast_log_gamma(model: nn.Module, stage: Stage, cfg: TrainConfig) -> float:
    """The training-only appearance augmentation of ``stage`` (``WindowSource.draw``; 0: none).

    Only windows are augmented, and never for a mask-only model (``model.informed_slice = false``):
    with no informed slice to read the curve from, it could only learn a blurred average appearance.
    """
    if stage in ("informed", "autoencoder") or not isinstance(model, SliceDenoiser) or not model.cfg.informed_slice:
        return 0.0
    return cfg.appearance_log_gamma


def noised_inputs(
    model: nn.Module,
    process: NoiseProcess,
    batch: WindowBatch | SliceBatch,
    stage: Stage,
    generator: torch.Generator,
    cfg: TrainConfig,
    timestep: int | None = None,
) -> DenoisingInputs:
    """Noise an already drawn ``batch`` (on the model's device) for ``stage``, at ``timestep`` if given.

    The autoencoder stage is not noised: its inputs are the slices and their reparameterisation noise.
    """
    if stage == "autoencoder":
        assert isinstance(model, SliceAutoencoder) and isinstance(batch, SliceBatch)
        return autoencoder_inputs(model, batch, generator)
    if stage == "informed":
        assert isinstance(model, InformedSliceGenerator) and isinstance(batch, SliceBatch)
        return slice_inputs(model, process, batch, generator, timestep)
    assert isinstance(model, WindowDenoiser) and isinstance(batch, WindowBatch)
    if stage == "slice":
        return window_inputs(model, process, batch, generator, per_slice_t=True, timestep=timestep)
    return window_inputs(
        model, process, batch, generator, per_slice_t=False, t_power=cfg.volume_t_power, timestep=timestep
    )


def draw_inputs(
    model: nn.Module,
    process: NoiseProcess,
    source: WindowSource,
    indices: list[int],
    stage: Stage,
    generator: torch.Generator,
    cfg: TrainConfig,
    device: torch.device,
    timestep: int | None = None,
    augment: bool = False,
) -> DenoisingInputs:
    """Draw one sample per volume index for ``stage`` and noise it (to ``timestep``, if given, else a drawn one).

    Every draw comes from ``generator``, in turn (DP-SGD's secret one, or validation's seeded one).
    ``augment``: apply the training-only appearance augmentation (``contrast_log_gamma``);
    DP training passes it, validation and the audit do not.
    """
    log_gamma = contrast_log_gamma(model, stage, cfg) if augment else 0.0
    batch = source.draw(indices, generator, stage in ("slice", "volume"), log_gamma)
    return noised_inputs(model, process, batch.to(device), stage, generator, cfg, timestep)


def predict(model: nn.Module, inputs: DenoisingInputs) -> torch.Tensor:
    """The network's prediction for ``inputs`` (either model type)."""
    if isinstance(model, InformedSliceGenerator):
        assert inputs.position is not None
        return model(inputs.noisy, inputs.t, inputs.position, inputs.mask)
    assert inputs.cond is not None
    return model(inputs.noisy, inputs.t, inputs.cond)


def per_sample_loss(model: nn.Module, inputs: DenoisingInputs) -> torch.Tensor:
    """``[B]`` mean squared error of each sample (window or slice), weighted per timestep if ``inputs.weight``;
    for the autoencoder its reconstruction loss (``SliceAutoencoder.reconstruction_loss``)."""
    if isinstance(model, SliceAutoencoder):
        assert inputs.noise is not None
        return model.reconstruction_loss(inputs.noisy, inputs.noise)
    return weighted_error(predict(model, inputs), inputs.target, inputs.weight)


def weighted_error(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``[B]``: each sample's mean squared error, weighted per timestep: the one diffusion loss.

    Args:
        prediction, target: ``[B, 1, D, H, W]`` (windows, volumes) or ``[B, 1, H, W]`` (slices).
        weight: ``[B, D]`` (a timestep per frame of a window), ``[B]`` (one per sample), or None.
    """
    error = (prediction - target) ** 2
    if weight is not None:
        error = error * (
            weight[:, None, :, None, None] if weight.ndim == 2 else weight.reshape(-1, *[1] * (error.ndim - 1))
        )
    return error.flatten(1).mean(dim=1)


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter], max_norm: float
) -> torch.Tensor:
    """One step on ``loss``: gradients reset, backward, clipped to ``max_norm`` (global norm), applied.

    Returns:
        the gradients' norm before clipping (a 0-dim tensor; reading it waits for the device).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return grad_norm


def train(
    state: TrainState,
    process: NoiseProcess,
    source: WindowSource,
    stage: Stage,
    until_step: int,
    cfg: TrainConfig,
    on_step: OnStep | None = None,
) -> dict[str, float]:
    """Train ``state`` for ``stage`` until ``state.step == until_step``.

    Each step draws ``cfg.batch_size`` volume indices (uniform, with replacement), one sample
    from each (``gem3d.data.loader.StepBatches``, drawn ahead by ``cfg.loader_workers``
    processes), noises them on the device, takes an AdamW step with gradient clipping and
    updates the EMA. Step n's draws depend on ``(state.seed, n)`` only: the same seed gives the
    same weights on the same device, for any number of loader workers and across a resume. The
    host waits for the device only when ``on_step`` asks for the step's numbers, and at the end.

    Under a process group of N ranks (``gem3d.distributed``, torchrun) ``cfg.batch_size`` is the
    global batch: every rank draws it whole, computes its B / N rows, and DDP averages the
    gradients, so clipping, AdamW and the EMA are the same on every rank and the weights those of
    one process with the same batch (to float rounding: the sums are ordered differently). The
    metrics, the loss included, are the global batch's on every rank.

    Returns:
        ``{"loss": mean loss over these steps, "steps": steps taken, "steps_per_s": ...}``.
    """
    device = next(state.model.parameters()).device
    params = trainable_parameters(state.model)
    state.model.train()
    started, first_step = time.perf_counter(), state.step
    total = torch.zeros((), device=device)
    log_gamma = contrast_log_gamma(state.model, stage, cfg)
    batches = StepBatches(source, stage in ("slice", "volume"), cfg.batch_size, state.seed, log_gamma)
    current = distributed.world()
    parallel = data_parallel_loss(state.model, cfg.batch_size, current) if current.size > 1 else None
    for batch in step_batches(batches, state.step, until_step, cfg, device):
        generator = noise_generator(state.seed, state.step, device)
        inputs = noised_inputs(state.model, process, batch.to(device, non_blocking=True), stage, generator, cfg)
        if parallel is None:
            loss = per_sample_loss(state.model, inputs).mean()
        else:
            # Every rank drew and noised the whole global batch from (seed, step), exactly as one
            # process does, and computes only its rows; DDP averages the rank means during the
            # backward, which is the global mean's gradient (equal shards).
            loss = parallel(shard_inputs(inputs, distributed.shard(cfg.batch_size, current))).mean()
        grad_norm = optimizer_step(state.optimizer, loss, params, cfg.grad_clip)
        if parallel is not None:
            loss = distributed.all_reduce_sum(loss.detach()) / current.size  # the global batch's loss, for metrics
        state.ema.update_parameters(state.model)
        state.step += 1
        total += loss.detach()
        if on_step is not None:
            on_step({"step": state.step, "loss": loss.item(), "grad_norm": float(grad_norm)})
    steps = state.step - first_step
    elapsed = time.perf_counter() - started
    return {
        "loss": float(total) / steps if steps else float("nan"),
        "steps": float(steps),
        "steps_per_s": steps / elapsed if elapsed > 0 else 0.0,
    }


class _BatchLoss(nn.Module):
    """``per_sample_loss`` of a model as a module's ``forward``, so DDP can wrap the loss, whichever
    network (and whichever of its methods: the autoencoder's loss is not its ``forward``) it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: DenoisingInputs) -> torch.Tensor:
        return per_sample_loss(self.model, inputs)


def data_parallel_loss(
    model: nn.Module, batch_size: int, current: distributed.World
) -> nn.parallel.DistributedDataParallel:
    """``per_sample_loss`` of ``model`` under DDP: its backward averages the trainable gradients over the ranks.

    The wrapper is around a loss module holding ``model``, never saved: the model's own
    ``state_dict`` keeps its names (no ``module.`` prefix), and the frozen parts (a frozen stage-2
    base, a latent codec) have no gradient, so DDP leaves them alone. Building it broadcasts
    rank 0's weights, which are every rank's already (seeded initialisation or the same checkpoint).
    """
    distributed.check_batch(batch_size, current)
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        _BatchLoss(model),
        device_ids=[device.index] if device.type == "cuda" else None,
    )


def shard_inputs(inputs: DenoisingInputs, rows: slice) -> DenoisingInputs:
    """The ``rows`` of every batched field of ``inputs`` (each field's leading axis is the batch)."""
    values = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    return replace(inputs, **{name: value[rows] for name, value in values.items() if value is not None})


def noise_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s timesteps and diffusion noise, on ``device`` (no host copy)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, "noise"))


TrainFn = Callable[[TrainState, NoiseProcess, WindowSource, Stage, int, TrainConfig, OnStep | None], dict[str, float]]


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    process: NoiseProcess,
    source: WindowSource,
    stage: Stage,
    cfg: TrainConfig,
    batches: int,
    seed: int,
) -> float:
    """Mean denoising loss on ``batches`` fixed draws of ``cfg.batch_size`` samples (same seed, same draws).

    Used by the sites (held-out cases) and the server (its own split) to score global models.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(max(batches, 1)):
        indices = torch.randint(len(source), (cfg.batch_size,), generator=generator).tolist()
        total += float(
            per_sample_loss(model, draw_inputs(model, process, source, indices, stage, generator, cfg, device)).mean()
        )
    model.train(was_training)
    return total / max(batches, 1)


def held_out_loss(model: nn.Module, stage: Stage, volumes: list[Volume], cfg: Config, batches: int, seed: int) -> float:
    """``validation_loss`` on windows of ``volumes`` under ``cfg`` (the sites' and the server's evaluation)."""
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    return validation_loss(model, noise_process(cfg.diffusion), source, stage, cfg.train, batches, seed)
