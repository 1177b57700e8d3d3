"""DP-SGD for the three GEM-3D stages: a drop-in for ``gem3d.training.train``.

Privacy unit: the patient (one volume). Each step Poisson-samples *volume indices* with
Opacus's ``UniformWithReplacementSampler`` at rate q = expected batch / number of volumes, and
draws exactly one window (stage 1, stage 2) or one slice (informed generator) from each
sampled volume; its informed slice comes from the same volume. So a patient contributes at
most one sample, hence one clipped per-sample gradient, to any step, and the Opacus accountant
over (noise multiplier, q, steps) bounds what the weights reveal about any one patient.

Caveats of that unit:
* It holds only if every volume in a site's dataset is a different patient. Two scans of one
  patient are two units, and the guarantee per patient weakens accordingly (group privacy).
* The accountant assumes Poisson subsampling under add/remove-one adjacency, with q fixed from
  the dataset size N (``UniformWithReplacementSampler``: batches are drawn independently, i.e.
  with replacement across steps, never within one). The batch size varies, and an empty batch
  is still a noise step.
* Loss values reported through ``on_step`` and the returned metrics are not privatised.

Per-sample gradients: the denoiser reshapes a window ``[B, C, D, H, W]`` into ``[B*D, C, H, W]``
slices inside ``forward`` (and stage 2 reshapes again into per-pixel sequences), so Opacus's
hook-based ``GradSampleModule`` would compute per-*slice* gradients: the wrong unit. Instead
the module is never wrapped; per-window gradients come from ``torch.func`` (``vmap`` of
``grad`` over a ``functional_call``) on inputs drawn outside ``vmap`` (no randomness inside),
are placed in each trainable parameter's ``p.grad_sample``, and Opacus's ``DPOptimizer``,
wrapping the state's AdamW, clips each to ``max_grad_norm``, sums, adds Gaussian noise and
divides by the expected batch size. Models whose forward ``vmap`` cannot trace (the informed
generator's one-hot mask encoding checks the label range, a data-dependent ``.item()``) fall
back to one autograd pass per sample, which computes the same gradients.

Because the module is never wrapped, its ``state_dict`` has no ``_module.`` prefixes: weights
leave a site exactly as ``gem3d.training`` names them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from monai.networks.schedulers import DDPMScheduler
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gem3d.config import PrivacyConfig, TrainConfig
from gem3d.data.windows import WindowSource
from gem3d.errors import ConfigError
from gem3d.networks import InformedSliceGenerator
from gem3d.training import DenoisingInputs, OnStep, Stage, TrainState, draw_inputs, per_sample_loss
from privacy.ledger import PrivacyLedger

GradSampleMode = Literal["vmap", "loop"]


def sample_rate(batch_size: int, num_volumes: int) -> float:
    """Poisson rate q = expected batch / number of volumes (1 when the batch covers the site)."""
    return min(1.0, batch_size / num_volumes)


def resolve_noise_multiplier(privacy_cfg: PrivacyConfig, rate: float, planned_steps: int) -> float:
    """σ from ``privacy.target_epsilon`` when set, else ``privacy.noise_multiplier``.

    A target ε is for ``planned_steps`` steps at rate ``rate`` alone (as Opacus's
    ``make_private_with_epsilon``); the ledger's budget caps the site's total over all stages.
    """
    if privacy_cfg.target_epsilon is not None:
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=privacy_cfg.target_epsilon,
                    target_delta=privacy_cfg.delta,
                    sample_rate=rate,
                    steps=max(planned_steps, 1),
                    accountant=privacy_cfg.accountant,
                )
            )
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise ConfigError(
                f"privacy.target_epsilon={privacy_cfg.target_epsilon:g}: no noise multiplier reaches it "
                f"in {planned_steps} steps at sample rate {rate:.4g} ({error})"
            ) from None
    if privacy_cfg.noise_multiplier is None:
        raise ConfigError("privacy: set privacy.noise_multiplier or privacy.target_epsilon")
    return float(privacy_cfg.noise_multiplier)


def grad_sample_mode(model: nn.Module) -> GradSampleMode:
    """``vmap`` where ``torch.func`` can trace the forward, else ``loop`` (one backward per sample).

    The informed generator one-hot encodes its mask inside ``forward``; ``F.one_hot`` checks the
    label range with a data-dependent ``.item()``, which ``vmap`` refuses.
    """
    if isinstance(model, InformedSliceGenerator) and model.cfg.condition_on_mask and model.mask_encoding == "onehot":
        return "loop"
    return "vmap"


def _fields(inputs: DenoisingInputs) -> dict[str, torch.Tensor]:
    """The batched tensors of ``inputs`` (``None`` fields left out)."""
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs) if getattr(inputs, f.name) is not None}


def _one_sample(fields: dict[str, torch.Tensor]) -> DenoisingInputs:
    """``DenoisingInputs`` of batch size 1 from per-sample tensors (leading batch axis removed)."""
    kwargs: dict[str, torch.Tensor | None] = {"cond": None}
    kwargs.update({name: value.unsqueeze(0) for name, value in fields.items()})
    return DenoisingInputs(**kwargs)  # type: ignore[arg-type]


def per_sample_gradients(
    model: nn.Module, inputs: DenoisingInputs, mode: GradSampleMode | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients of ``per_sample_loss`` for every trainable parameter.

    Args:
        inputs: a batch of B samples (windows or slices), drawn outside this function.
        mode: ``vmap`` or ``loop``; default ``grad_sample_mode(model)``.
    Returns:
        ``({name: [B, *param.shape]}, losses [B])``; the sample i gradient is that of sample i's
        own mean squared error, as if it were trained alone.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    mode = mode or grad_sample_mode(model)
    batch = int(inputs.noisy.shape[0])
    if mode == "loop":
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in trainable}
        losses = []
        for index in range(batch):
            one = _one_sample({name: value[index] for name, value in _fields(inputs).items()})
            loss = per_sample_loss(model, one).sum()
            for name, g in zip(trainable, torch.autograd.grad(loss, list(trainable.values())), strict=True):
                grads[name].append(g)
            losses.append(loss.detach())
        return {name: torch.stack(gs) for name, gs in grads.items()}, torch.stack(losses)

    # functional_call on a wrapper swaps in the vmapped parameters; the model itself is untouched.
    wrapper = _SampleLoss(model)
    constants = {f"model.{name}": p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    constants.update({f"model.{name}": b for name, b in model.named_buffers()})

    def sample_loss(params: dict[str, torch.Tensor], fields: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = {f"model.{name}": value for name, value in params.items()}
        return functional_call(wrapper, {**tensors, **constants}, (fields,))

    params = {name: p.detach() for name, p in trainable.items()}
    # randomness="different": dropout (if any) draws per sample, as in batched training.
    grads_v, losses_v = vmap(grad_and_value(sample_loss), in_dims=(None, 0), randomness="different")(
        params, _fields(inputs)
    )
    return dict(grads_v), losses_v.detach()


class _SampleLoss(nn.Module):
    """One sample's loss as a module, so ``functional_call`` can run it with swapped parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_sample_loss(self.model, _one_sample(fields)).sum()


def train_private(
    state: TrainState,
    scheduler: DDPMScheduler,
    source: WindowSource,
    stage: Stage,
    until_step: int,
    train_cfg: TrainConfig,
    on_step: OnStep | None = None,
    *,
    privacy_cfg: PrivacyConfig,
    ledger: PrivacyLedger,
    planned_steps: int | None = None,
) -> dict[str, float]:
    """DP-SGD for ``stage`` until ``state.step == until_step``; same contract as ``gem3d.training.train``.

    Checks the ledger for all ``until_step - state.step`` steps before the first one and records
    the steps actually taken before returning (also on an exception), so a checkpoint written
    after this call is always accounted for. ``train_cfg.grad_clip`` is replaced by
    ``privacy_cfg.max_grad_norm``, the per-sample clipping bound.

    Args:
        planned_steps: the steps a ``target_epsilon`` is spread over (default ``until_step``).
    Returns:
        ``train``'s metrics plus ``epsilon``, ``delta`` (the site's totals from the ledger),
        ``noise_multiplier`` and ``sample_rate``.
    Raises:
        PrivacyBudgetError: the steps would push the site past ``privacy_cfg.budget_epsilon``.
    """
    device = next(state.model.parameters()).device
    num_volumes = len(source)
    rate = sample_rate(train_cfg.batch_size, num_volumes)
    sigma = resolve_noise_multiplier(privacy_cfg, rate, planned_steps or until_step)
    to_take = until_step - state.step
    summary = {"noise_multiplier": sigma, "sample_rate": rate, "delta": ledger.delta}
    if to_take <= 0:
        return {"loss": float("nan"), "steps": 0.0, "steps_per_s": 0.0, "epsilon": ledger.epsilon, **summary}
    ledger.check(to_take, sigma, rate)

    params = [p for p in state.model.parameters() if p.requires_grad]
    names = {id(p): name for name, p in state.model.named_parameters()}
    mode = grad_sample_mode(state.model)
    # DP noise comes from a generator seeded from OS entropy, never from train.seed: noise an
    # observer can regenerate would cancel out and protect nothing. DP runs are therefore not
    # bit-reproducible, unlike non-DP ones.
    noise_generator = torch.Generator(device=device)
    noise_generator.seed()
    optimizer = DPOptimizer(
        state.optimizer,
        noise_multiplier=sigma,
        max_grad_norm=privacy_cfg.max_grad_norm,
        expected_batch_size=min(train_cfg.batch_size, num_volumes),
        loss_reduction="mean",
        generator=noise_generator,
    )
    sampler = UniformWithReplacementSampler(
        num_samples=num_volumes, sample_rate=rate, generator=state.generator, steps=to_take
    )
    state.model.train()
    started, taken, total_loss, loss_steps = time.perf_counter(), 0, 0.0, 0
    try:
        for indices in sampler:
            optimizer.zero_grad(set_to_none=True)
            if indices:
                inputs = draw_inputs(state.model, scheduler, source, indices, stage, state.generator, train_cfg, device)
                grads, losses = per_sample_gradients(state.model, inputs, mode)
                for p in params:
                    p.grad_sample = grads[names[id(p)]]  # type: ignore[attr-defined]
                norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
            else:  # an empty Poisson batch is still a step: the update is pure noise
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
                losses = norms = torch.zeros(0)
            optimizer.step()
            state.ema.update_parameters(state.model)
            state.step += 1
            taken += 1
            if len(losses):
                total_loss += float(losses.mean())
                loss_steps += 1
            if on_step is not None:
                on_step(
                    {
                        "step": state.step,
                        "loss": float(losses.mean()) if len(losses) else float("nan"),
                        "grad_norm": float(norms.mean()) if len(norms) else 0.0,
                        "clipped_fraction": float((norms > privacy_cfg.max_grad_norm).float().mean())
                        if len(norms)
                        else 0.0,
                        "batch_size": float(len(indices)),
                    }
                )
    finally:
        epsilon = ledger.record(taken, sigma, rate, label=stage)
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # leave plain torch parameters behind, nothing Opacus-specific
            for attribute in ("grad_sample", "summed_grad"):
                if hasattr(p, attribute):
                    delattr(p, attribute)
    elapsed = time.perf_counter() - started
    return {
        "loss": total_loss / loss_steps if loss_steps else float("nan"),
        "steps": float(taken),
        "steps_per_s": taken / elapsed if elapsed > 0 else 0.0,
        "epsilon": epsilon,
        **summary,
    }
