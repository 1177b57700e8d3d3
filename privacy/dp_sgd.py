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
* Loss values reported through ``on_step`` and the returned metrics are not privatised: they
  are for the site's own eyes (a federated DP site does not send them, ``client/task.py``).
* Every random draw of a DP step comes from ``secret_generator`` (OS entropy), not from
  ``train.seed``: the Poisson sample must be secret from everyone, the coordinator included.

Per-sample gradients: the denoiser reshapes a window ``[B, C, D, H, W]`` into ``[B*D, C, H, W]``
slices inside ``forward`` (and stage 2 reshapes again into ``[B*H*W, C, D]`` per-pixel sequences),
so every layer sees a batch of ``B*D`` (or ``B*H*W``) elements, not of B windows. Three ways to get
per-*window* gradients, each checked against one plain backward per window (tests/test_privacy_dp.py)
and timed side by side (experiments/benchmarks/privacy.py); ``privacy.grad_sample_mode`` picks one:

* ``loop``: one autograd pass per window. Plain torch, any model.
* ``vmap``: ``torch.func`` (``vmap`` of ``grad`` over a ``functional_call``) on inputs drawn outside
  ``vmap`` (no randomness inside). Not for the informed generator conditioned on a one-hot mask:
  ``F.one_hot`` checks the label range with a data-dependent ``.item()``, which ``vmap`` refuses.
* ``hooks``: Opacus's ``GradSampleHooks`` (the hooks of ``GradSampleModule``, attached without
  wrapping) give per-*element* gradients ``[B*n, *param.shape]`` in one batched backward; every
  reshape in ``gem3d.networks`` keeps the window index outermost (``b*D + d``,
  ``b*H*W + pixel``), so summing groups of n consecutive elements gives per-window gradients.
* ``auto`` (default): ``loop``, the fastest of the three on CPU in the benchmark; see
  ``resolve_grad_sample_mode``.

Opacus's ghost clipping is not offered: it computes per-element gradient *norms* (ghost norms for
``Linear``/``Embedding`` only in Opacus 1.6; other layers materialise per-element gradients), and a
window's norm is not a function of its slices' norms, so it clips per slice (the wrong privacy
unit; the benchmark shows its update differing from the per-window one).

The per-window gradients are placed in each trainable parameter's ``p.grad_sample``, and
Opacus's ``DPOptimizer``, wrapping the state's AdamW, clips each to ``max_grad_norm``, sums, adds
Gaussian noise and divides by the expected batch size.

Because the module is never wrapped, its ``state_dict`` has no ``_module.`` prefixes: weights
leave a site exactly as ``gem3d.training`` names them.

Several processes (``gem3d.distributed``, torchrun) run the mechanism of one process:
* rank 0 alone draws the Poisson sample, with its secret generator, and broadcasts it; the
  sampled patients are dealt out over the ranks (every N-th), so each is still in exactly one
  rank's share and contributes one clipped gradient;
* each rank draws its patients' windows, timesteps and noise from its own secret generator and
  clips their per-window gradients; ``distributed_dp_optimizer`` (Opacus's
  ``DistributedDPOptimizer``) adds the Gaussian noise on rank 0 only and sums the ranks' clipped,
  noised parts, each already divided by the *global* expected batch, in one flat all-reduce;
* so the update is (sum over the sampled patients of their clipped gradients + N(0, σ²C²)) / E,
  the single-process update, and the accountant's (σ, q, steps) are unchanged: only rank 0
  reserves and settles them in the ledger, once per step of the site, not per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gem3d import distributed
from gem3d.config import PrivacyConfig, TrainConfig
from gem3d.data.windows import WindowSource
from gem3d.diffusion import NoiseProcess
from gem3d.errors import ConfigError
from gem3d.networks import InformedSliceGenerator
from gem3d.training import DenoisingInputs, OnStep, Stage, TrainState, draw_inputs, per_sample_loss
from privacy.ledger import PrivacyLedger

GradSampleMode = Literal["loop", "vmap", "hooks"]
GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = ("loop", "vmap", "hooks")


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's CSPRNG (``secrets``), for private draws.

    Used for everything a DP-SGD step draws: the Poisson sample of patients, the window,
    timesteps and diffusion noise drawn for each, and the mechanism's Gaussian noise. None of it
    may be reproducible from ``train.seed``, the seed a server sends or anything a checkpoint
    stores: whoever could regenerate the Poisson sample knows which patients were in each batch,
    and subsampling amplification, on which the accountant's ε rests, is void. The seed is 128
    bits from ``secrets`` and is never stored, so DP runs are not bit-reproducible (non-DP runs
    still are). The generator itself (Mersenne Twister on CPU, Philox on CUDA) is not a CSPRNG:
    its outputs stay inside this process, and only the noised weights leave it.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(128) % (2**64))
    return generator


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


def vmap_supported(model: nn.Module) -> bool:
    """Whether ``torch.func`` can trace ``model``'s forward.

    The informed generator one-hot encodes its mask inside ``forward``; ``F.one_hot`` checks the
    label range with a data-dependent ``.item()``, which ``vmap`` refuses.
    """
    return not (
        isinstance(model, InformedSliceGenerator) and model.cfg.condition_on_mask and model.mask_encoding == "onehot"
    )


def resolve_grad_sample_mode(model: nn.Module, requested: str = "auto") -> GradSampleMode:
    """The per-sample gradient method for ``model``: ``requested``, or for ``auto`` the measured default.

    ``auto`` is ``loop`` on every device: on CPU it was the fastest correct mode in
    experiments/benchmarks/privacy.py (see RESULTS.md); no GPU was available to measure, so CUDA
    gets the same choice until measured there. ``vmap`` on a model it cannot trace, and any mode
    for an adversarial autoencoder, fall back to ``loop``, which computes the same gradients.
    """
    if requested == "auto":
        return "loop"
    if requested not in GRAD_SAMPLE_MODES:
        raise ConfigError(f"privacy.grad_sample_mode={requested!r}: expected auto, {', '.join(GRAD_SAMPLE_MODES)}")
    if requested == "vmap" and not vmap_supported(model):
        return "loop"
    if getattr(model, "discriminator", None) is not None:
        # an adversarial stage 0 judges its reconstruction through the discriminator's detached
        # weights: Opacus's hooks would count that pass as the discriminator's own gradient
        return "loop"
    return requested  # type: ignore[return-value]


def _fields(inputs: DenoisingInputs) -> dict[str, torch.Tensor]:
    """The batched tensors of ``inputs`` (``None`` fields left out)."""
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs) if getattr(inputs, f.name) is not None}


def _one_sample(fields: dict[str, torch.Tensor]) -> DenoisingInputs:
    """``DenoisingInputs`` of batch size 1 from per-sample tensors (leading batch axis removed)."""
    kwargs: dict[str, torch.Tensor | None] = {"cond": None}
    kwargs.update({name: value.unsqueeze(0) for name, value in fields.items()})
    return DenoisingInputs(**kwargs)  # type: ignore[arg-type]


def per_sample_gradients(
    model: nn.Module, inputs: DenoisingInputs, mode: str = "auto"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients of ``per_sample_loss`` for every trainable parameter.

    Args:
        inputs: a batch of B samples (windows or slices), drawn outside this function.
        mode: ``loop``, ``vmap``, ``hooks`` or ``auto`` (``resolve_grad_sample_mode``).
    Returns:
        ``({name: [B, *param.shape]}, losses [B])``; the sample i gradient is that of sample i's
        own mean squared error, as if it were trained alone.
    """
    resolved = resolve_grad_sample_mode(model, mode)
    if resolved == "loop":
        return _loop_gradients(model, inputs)
    if resolved == "hooks":
        return _hooks_gradients(model, inputs)
    return _vmap_gradients(model, inputs)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _loop_gradients(model: nn.Module, inputs: DenoisingInputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One autograd pass per sample: the reference the other modes are checked against."""
    trainable = _trainable(model)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in trainable}
    losses = []
    for index in range(int(inputs.noisy.shape[0])):
        one = _one_sample({name: value[index] for name, value in _fields(inputs).items()})
        loss = per_sample_loss(model, one).sum()
        for name, g in zip(trainable, torch.autograd.grad(loss, list(trainable.values())), strict=True):
            grads[name].append(g)
        losses.append(loss.detach())
    return {name: torch.stack(gs) for name, gs in grads.items()}, torch.stack(losses)


def _hooks_gradients(model: nn.Module, inputs: DenoisingInputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One batched backward with Opacus's per-layer hooks; per-element gradients summed per window.

    With ``loss_reduction="sum"`` over the per-window losses, element e's hook gradient is the
    gradient of its own window's loss through e; a window's gradient is the sum over its elements.
    """
    trainable = _trainable(model)
    batch = int(inputs.noisy.shape[0])
    # strict=False: the validator's buffer check is ModuleValidator's job (tests), not each step's.
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        losses = per_sample_loss(model, inputs)
        with warnings.catch_warnings():
            # the first layer's input (data) needs no gradient, so its hook fires on the output's
            # gradient: exactly what Opacus reads; torch warns about it on every call
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            # autograd.grad, not backward: p.grad stays untouched and the module hooks still fire
            torch.autograd.grad(losses.sum(), list(trainable.values()))
        grads = {}
        for name, p in trainable.items():
            sample = p.grad_sample  # type: ignore[attr-defined]
            if not isinstance(sample, torch.Tensor) or sample.shape[0] % batch:
                raise RuntimeError(f"hooks: no per-element gradient of {name} divisible into {batch} samples")
            grads[name] = sample.reshape(batch, -1, *p.shape).sum(dim=1)
    finally:
        hooks.remove_hooks()
        hooks.cleanup()
        for module in model.modules():  # Opacus leaves its (emptied) activation lists behind
            for attribute in ("activations", "max_batch_len"):
                if hasattr(module, attribute):
                    delattr(module, attribute)
    return grads, losses.detach()


def _vmap_gradients(model: nn.Module, inputs: DenoisingInputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``torch.func``: ``vmap`` of ``grad`` over the model with swapped-in parameters."""
    trainable = _trainable(model)
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


class _FlatDistributedDPOptimizer(DistributedDPOptimizer):  # type: ignore[misc]  # Opacus is untyped
    """Opacus's ``DistributedDPOptimizer`` with the ranks' parts *summed* in one flat all-reduce.

    Opacus all-reduces parameter by parameter (a collective each) and divides by the world size;
    here every rank's part is already divided by the global expected batch (``scale_grad``), so
    the sum is the update, and one collective carries all of it.
    """

    def reduce_gradients(self) -> None:
        grads = [p.grad for p in self.params if p.requires_grad]
        flat = distributed.all_reduce_sum(torch._utils._flatten_dense_tensors(grads))
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
) -> DPOptimizer:
    """Opacus's optimizer over ``optimizer``: clip each sample to ``max_grad_norm``, sum, add
    N(0, (``noise_multiplier`` · ``max_grad_norm``)²) from ``generator``, divide by ``expected_batch_size``.

    Under several processes the ranks' clipped sums are added and the noise is drawn once, on rank 0
    from its ``generator`` (the others' is unused: pass ``None``), so the result is one process's.
    """
    kwargs: dict[str, Any] = {
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "expected_batch_size": expected_batch_size,
        "loss_reduction": "mean",
        "generator": generator,
    }
    if distributed.world().size == 1:
        return DPOptimizer(optimizer, **kwargs)
    return _FlatDistributedDPOptimizer(optimizer, **kwargs)


def _shared_sample(sampled: list[int] | None, num_volumes: int, device: torch.device) -> list[int]:
    """Rank 0's Poisson sample on every rank (broadcast as a ``[num_volumes]`` 0/1 mask); ``sampled``
    is rank 0's, ``None`` elsewhere."""
    if distributed.world().size == 1:
        assert sampled is not None
        return sampled
    mask = torch.zeros(num_volumes, dtype=torch.uint8, device=device)
    if sampled:
        mask[torch.tensor(sampled, device=device)] = 1
    return [int(i) for i in distributed.broadcast(mask).nonzero().flatten().tolist()]


def train_private(
    state: TrainState,
    process: NoiseProcess,
    source: WindowSource,
    stage: Stage,
    until_step: int,
    train_cfg: TrainConfig,
    on_step: OnStep | None = None,
    *,
    privacy_cfg: PrivacyConfig,
    ledger: PrivacyLedger | None,
    planned_steps: int | None = None,
) -> dict[str, float]:
    """DP-SGD for ``stage`` until ``state.step == until_step``; same contract as ``gem3d.training.train``.

    Reserves all ``until_step - state.step`` steps in the ledger (under its lock) before the first
    one and settles the reservation to the steps actually taken before returning (also on an
    exception), so a checkpoint written after this call is always accounted for. Every random
    draw comes from ``secret_generator``; ``state.generator`` is neither used nor advanced, so a
    checkpoint holds no trace of the Poisson sample. ``train_cfg.grad_clip`` is replaced by
    ``privacy_cfg.max_grad_norm``, the per-sample clipping bound.

    Under several processes (``gem3d.distributed``) every rank calls this with the same arguments
    and the site's ``train.batch_size`` as the expected batch: rank 0 samples, reserves and
    settles (see the module's docstring), the others pass ``ledger=None``; every rank returns the
    same metrics and ends with the same weights.

    Args:
        ledger: the site's ledger; ``None`` on ranks other than 0 (and only there).
        planned_steps: the steps a ``target_epsilon`` is spread over (default ``until_step``).
    Returns:
        ``train``'s metrics plus ``epsilon``, ``delta`` (the site's totals from the ledger),
        ``noise_multiplier`` and ``sample_rate``; ``loss``, ``grad_norm`` and ``batch_size`` in
        ``on_step`` are over all ranks' patients.
    Raises:
        PrivacyBudgetError: the steps would push the site past ``privacy_cfg.budget_epsilon``.
    """
    device = next(state.model.parameters()).device
    current = distributed.world()
    if (ledger is None) == current.leader:
        raise ValueError("train_private: rank 0 (and only rank 0) spends from the ledger; pass it there alone")
    num_volumes = len(source)
    rate = sample_rate(train_cfg.batch_size, num_volumes)
    sigma = resolve_noise_multiplier(privacy_cfg, rate, planned_steps or until_step)
    to_take = until_step - state.step
    summary = {"noise_multiplier": sigma, "sample_rate": rate}
    if to_take <= 0:
        return {"loss": float("nan"), "steps": 0.0, "steps_per_s": 0.0, **_site_totals(ledger, device), **summary}
    params = [p for p in state.model.parameters() if p.requires_grad]
    mode = resolve_grad_sample_mode(state.model, privacy_cfg.grad_sample_mode)
    # Every draw of a DP step is secret (see secret_generator): the Poisson sample, the windows,
    # timesteps and diffusion noise drawn for it, and the Gaussian noise of the mechanism. Each
    # rank has its own; rank 0's alone draws the sample and the mechanism's noise.
    secret = secret_generator()
    optimizer = dp_optimizer(
        state.optimizer,
        sigma,
        privacy_cfg.max_grad_norm,
        min(train_cfg.batch_size, num_volumes),
        secret_generator(device) if current.leader else None,
    )
    sampler = _poisson_batches(num_volumes, rate, to_take, secret) if current.leader else None
    state.model.train()
    started, total_loss, loss_steps = time.perf_counter(), 0.0, 0
    # Reserved under the ledger's lock before the first step and settled to the steps taken on
    # the way out (an exception included); a killed process leaves its whole reservation counted.
    with contextlib.ExitStack() as stack:
        reservation = distributed.agreed(
            lambda: (
                stack.enter_context(ledger.reserve(to_take, sigma, rate, label=stage)) if ledger is not None else None
            )
        )
        try:
            for _ in range(to_take):
                everyone = _shared_sample(next(sampler) if sampler is not None else None, num_volumes, device)
                indices = distributed.split(everyone, current)
                optimizer.zero_grad(set_to_none=True)
                inputs = (
                    draw_inputs(state.model, process, source, indices, stage, secret, train_cfg, device, augment=True)
                    if indices
                    else None
                )
                losses, norms = _attach_grad_samples(state.model, params, inputs, mode)
                if reservation is not None:
                    reservation.taken += 1  # counted before the noisy update can leave this function
                optimizer.step()
                state.ema.update_parameters(state.model)
                state.step += 1
                loss_sum, count, norm_sum, clipped = _step_sums(losses, norms, privacy_cfg.max_grad_norm)
                if count:
                    total_loss += loss_sum / count
                    loss_steps += 1
                if on_step is not None:
                    on_step(_step_record(state.step, loss_sum, count, norm_sum, clipped, len(everyone)))
        finally:
            _drop_grad_samples(optimizer, params)
    elapsed = time.perf_counter() - started
    return {
        "loss": total_loss / loss_steps if loss_steps else float("nan"),
        "steps": float(to_take),
        "steps_per_s": to_take / elapsed if elapsed > 0 else 0.0,
        **_site_totals(ledger, device),
        **summary,
    }


def _poisson_batches(num_volumes: int, rate: float, steps: int, secret: torch.Generator) -> Iterator[list[int]]:
    """``steps`` Poisson samples of the ``num_volumes`` volume indices at ``rate``, from the secret generator."""
    return iter(UniformWithReplacementSampler(num_samples=num_volumes, sample_rate=rate, generator=secret, steps=steps))


def _step_record(
    step: int, loss_sum: float, count: float, norm_sum: float, clipped: float, batch: int
) -> dict[str, float]:
    """A DP step's ``on_step`` metrics: mean loss and gradient norm, the clipped fraction, the batch size."""
    return {
        "step": step,
        "loss": loss_sum / count if count else float("nan"),
        "grad_norm": norm_sum / count if count else 0.0,
        "clipped_fraction": clipped / count if count else 0.0,
        "batch_size": float(batch),
    }


def _drop_grad_samples(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Leave plain torch parameters behind: no gradients, nothing Opacus-specific."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        for attribute in ("grad_sample", "summed_grad"):
            if hasattr(p, attribute):
                delattr(p, attribute)


def _attach_grad_samples(
    model: nn.Module, params: list[nn.Parameter], inputs: DenoisingInputs | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trainable parameter's per-patient gradients as its ``grad_sample`` (what ``DPOptimizer`` clips).

    ``inputs`` None is an empty Poisson batch (or a rank's empty share): still a step, whose update
    is pure noise, so every ``grad_sample`` is empty.

    Returns:
        ``[B]`` each patient's loss and ``[B]`` the norm of its whole gradient (before clipping).
    """
    device = params[0].device
    if inputs is None:
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
        empty = torch.zeros(0, device=device)
        return empty, empty
    names = {id(p): name for name, p in model.named_parameters()}
    grads, losses = per_sample_gradients(model, inputs, mode)
    for p in params:
        p.grad_sample = grads[names[id(p)]]  # type: ignore[attr-defined]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    return losses, norms


def _step_sums(losses: torch.Tensor, norms: torch.Tensor, max_grad_norm: float) -> list[float]:
    """A step's figures summed over every rank's patients: ``[loss, patients, gradient norm, clipped]``."""
    sums = torch.stack(
        [
            losses.sum(),
            torch.tensor(float(len(losses)), device=losses.device),
            norms.sum(),
            (norms > max_grad_norm).sum().float(),
        ]
    ).to(losses.device, torch.float64)
    return distributed.all_reduce_sum(sums).tolist()


def _site_totals(ledger: PrivacyLedger | None, device: torch.device) -> dict[str, float]:
    """The site's ε and δ from rank 0's ledger, on every rank."""
    totals = torch.tensor([ledger.epsilon, ledger.delta] if ledger is not None else [0.0, 0.0], dtype=torch.float64)
    epsilon, delta = distributed.broadcast(totals.to(device)).tolist()
    return {"epsilon": epsilon, "delta": delta}
