"""Correctness of each grad-sample mode: its clipped DP-SGD update against a per-window reference.

For each ``privacy.grad_sample_mode`` (``loop``, ``vmap``, ``hooks``): the update ``DPOptimizer``
takes (noise off, SGD, learning rate 1) from the mode's per-sample gradients, against a reference
built by one plain ``backward`` per window, clipped and averaged by hand, with the clip bound at
half the smallest window norm so every window is clipped. Opacus's ghost clipping
(``GradSampleModuleFastGradientClipping``, two backwards per step, stage 1 only) clips per
*slice* (what its layers see as a batch element), so it is expected to fail this check; it is
timed for reference only (``dp_step_cost``). A mode is correct when the relative difference is
at most ``UPDATE_TOLERANCE``.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from experiments.benchmarks import markdown_table
from gem3d.training import DenoisingInputs, TrainState, per_sample_loss, shard_inputs
from privacy.dp_sgd import per_sample_gradients

UPDATE_TOLERANCE = 1e-4  # float32 sums in a different order; a wrong unit differs by O(1)


def reference_update(model: torch.nn.Module, inputs: DenoisingInputs, clip: float) -> list[torch.Tensor]:
    """The DP-SGD update (noise off, SGD lr 1) from per-window gradients computed the plain way.

    One ``backward`` per window (the privacy unit), each window's gradient scaled to norm at most
    ``clip``, summed and divided by the batch size, negated: what every mode must reproduce.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for index in range(int(inputs.noisy.shape[0])):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, shard_inputs(inputs, slice(index, index + 1))).sum().backward()
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        norm = torch.stack([(g**2).sum() for g in grads]).sum().sqrt()
        for acc, g in zip(total, grads, strict=True):
            acc += g * min(1.0, clip / (float(norm) + 1e-6))
    model.zero_grad(set_to_none=True)
    return [-t / int(inputs.noisy.shape[0]) for t in total]


def window_norms(model: torch.nn.Module, inputs: DenoisingInputs) -> torch.Tensor:
    """``[B]`` per-window gradient norms (loop mode)."""
    grads, _ = per_sample_gradients(model, inputs, "loop")
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)


def mode_update(model: torch.nn.Module, inputs: DenoisingInputs, mode: str, clip: float) -> list[torch.Tensor]:
    """The update ``DPOptimizer`` (noise off, SGD lr 1) takes from ``per_sample_gradients(mode)``."""
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=int(inputs.noisy.shape[0]),
    )
    grads, _ = per_sample_gradients(work, inputs, mode)
    for name, p in work.named_parameters():
        if p.requires_grad:
            p.grad_sample = grads[name]  # type: ignore[attr-defined]
    optimizer.step()
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


class OpacusGhost:
    """Opacus's ghost clipping as Opacus offers it, for stage 1: two backwards per step.

    Its unit is what each layer sees as a batch element: a *slice* here (the U-Net runs on
    ``[B*D, C, H, W]``), so the loss it reweights is per slice (window loss = mean over its D
    slices). It clips each slice's gradient, not each window's: timed for reference, and the
    update check shows the difference. Stage 2's trainable layers see ``B*H*W`` per-pixel
    sequences, whose losses do not separate, so ghost clipping has no loss to reweight there.
    """

    def __init__(self, state: TrainState, clip: float, noise: float, batch: int) -> None:
        self.state = state
        self.module = GradSampleModuleFastGradientClipping(
            state.model,
            batch_first=True,
            loss_reduction="sum",
            strict=False,
            max_grad_norm=clip,
            use_ghost_clipping=True,
        )
        self.optimizer = DPOptimizerFastGradientClipping(
            state.optimizer,
            noise_multiplier=noise,
            max_grad_norm=clip,
            expected_batch_size=batch,
            loss_reduction="mean",
        )

    def step(self, inputs: DenoisingInputs) -> None:
        assert inputs.cond is not None
        depth = inputs.noisy.shape[2]
        predicted = self.module(inputs.noisy, inputs.t, inputs.cond)  # [B, 1, D, H, W]
        per_slice = ((predicted - inputs.target) ** 2).mean(dim=(1, 3, 4)).reshape(-1) / depth  # [B*D], b-major
        self.optimizer.zero_grad(set_to_none=True)
        DPTensorFastGradientClipping(self.module, self.optimizer, per_slice, "sum").backward()
        self.optimizer.step()
        self.state.ema.update_parameters(self.state.model)
        self.state.step += 1


def ghost_update(model: torch.nn.Module, inputs: DenoisingInputs, clip: float) -> list[torch.Tensor]:
    """The update of one ``OpacusGhost`` step (noise off, SGD lr 1)."""
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    state = TrainState(work, _NoEma(), torch.optim.SGD(params, lr=1.0), torch.Generator())  # type: ignore[arg-type]
    ghost = OpacusGhost(state, clip, 0.0, int(inputs.noisy.shape[0]))
    ghost.step(inputs)
    ghost.module._close()
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


class _NoEma:
    def update_parameters(self, model: torch.nn.Module) -> None:
        pass


def update_difference(update: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max |update - reference| / max |reference| over all trainable parameters."""
    scale = max(float(r.abs().max()) for r in reference)
    return max(float((u - r).abs().max()) for u, r in zip(update, reference, strict=True)) / scale


def check_clip(model: torch.nn.Module, inputs: DenoisingInputs) -> float:
    """The check's clip bound: half the smallest window norm, so every window is clipped and clipping is tested."""
    return 0.5 * float(window_norms(model, inputs).min())


def update_differences(
    model: torch.nn.Module, inputs: DenoisingInputs, modes: list[str], clip: float, ghost: bool
) -> dict[str, float]:
    """Each mode's (and, if ``ghost``, ``opacus-ghost``'s) relative difference from the per-window reference."""
    reference = reference_update(model, inputs, clip)
    differences = {mode: update_difference(mode_update(model, inputs, mode, clip), reference) for mode in modes}
    if ghost:
        differences["opacus-ghost"] = update_difference(ghost_update(model, inputs, clip), reference)
    return differences


def mode_rows(label: str, stage: str, result: dict[str, Any]) -> list[list[str]]:
    """The mode table's rows for one time-worker result: each DP kind's step time, ratio and update check."""
    if "error" in result:
        return []
    rows = []
    for kind, ratio in result["ratio"].items():
        if kind == "non-DP":
            continue
        difference = result["update_rel_diff"][kind]
        pairs = result["pair_ratios"][kind]
        rows.append(
            [
                label,
                stage,
                kind,
                f"{statistics.median(result['s_per_step'][kind]):.3f}",
                f"{ratio:.2f}x ({min(pairs):.2f}-{max(pairs):.2f})",
                f"{difference:.1e}",
                "yes" if difference <= UPDATE_TOLERANCE else "no",
            ]
        )
    return rows


def print_mode_table(rows: list[list[str]]) -> None:
    """Print the grad-sample modes table (rows from ``mode_rows``)."""
    print(
        "\n## Grad-sample modes: DP step time vs non-DP, and the clipped update (noise off) against "
        f"the plain per-window reference (correct: relative difference <= {UPDATE_TOLERANCE:g})\n"
    )
    headers = ["config", "stage", "mode", "DP s/step", "DP/non-DP (pair range)", "update rel. diff", "correct"]
    print(markdown_table(headers, rows))
