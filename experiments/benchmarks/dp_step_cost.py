"""DP-SGD step cost: step time and peak memory of DP against non-DP training.

1. **Step time** (``time_worker``): ``gem3d.training.train`` and ``privacy.dp_sgd.train_private``
   with each ``privacy.grad_sample_mode`` (``loop``, ``vmap``, ``hooks``) on copies of the same
   model, same batch size, in one process, interleaved (``--repeats`` x ``--steps`` steps each,
   after one warm-up step each, the order rotated every repeat) so a change in the machine's load
   hits all of them. Stage 1 also runs Opacus's own ghost clipping (``dp_updates.OpacusGhost``,
   two backwards per step) in its native unit. The site has exactly ``batch_size`` volumes, so
   the Poisson rate is 1 and every DP batch is full size. The median DP/non-DP ratio of the
   ``auto`` mode is compared with the issue's target (at most ``TARGET_RATIO``). The same worker
   then checks each mode's clipped update (``dp_updates``) and the ledger's ε after the timed DP
   steps against Opacus's ``RDPAccountant`` stepped once per DP step (``dp_accounting``).
2. **Peak memory** (``peak_worker``): each of (stage, DP or not) in a fresh subprocess (RSS
   high-water mark above the loaded model and data); the DP/non-DP ratio.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks import markdown_table, peak_bytes, reset_peak
from experiments.benchmarks.dp_accounting import opacus_epsilon
from experiments.benchmarks.dp_setup import privacy_cfg, stage_setup
from experiments.benchmarks.dp_updates import OpacusGhost, check_clip, update_differences
from gem3d.config import Config, PrivacyConfig
from gem3d.data.windows import WindowSource
from gem3d.training import Stage, TrainState, draw_inputs, new_state, train
from privacy.dp_sgd import GRAD_SAMPLE_MODES, resolve_grad_sample_mode, sample_rate, train_private
from privacy.ledger import PrivacyLedger

TARGET_RATIO = 1.5


def _plain_runner(
    state: TrainState, process: Any, source: WindowSource, stage: Stage, cfg: Config
) -> Callable[[int], None]:
    """``n`` more non-DP steps of ``state``."""

    def run(n: int) -> None:
        train(state, process, source, stage, state.step + n, cfg.train)

    return run


def _private_runner(
    state: TrainState,
    process: Any,
    source: WindowSource,
    stage: Stage,
    cfg: Config,
    pcfg: PrivacyConfig,
    ledger: PrivacyLedger,
) -> Callable[[int], None]:
    """``n`` more DP steps of ``state`` under ``pcfg``, recorded in ``ledger``."""

    def run(n: int) -> None:
        train_private(state, process, source, stage, state.step + n, cfg.train, privacy_cfg=pcfg, ledger=ledger)

    return run


def _ghost_runner(
    ghost: OpacusGhost, process: Any, source: WindowSource, stage: Stage, cfg: Config
) -> Callable[[int], None]:
    """``n`` more Opacus ghost-clipping steps, each on every volume (Poisson rate 1, as in the other DP runs)."""
    generator = torch.Generator().manual_seed(cfg.train.seed)

    def run(n: int) -> None:
        for _ in range(n):
            indices = list(range(len(source)))
            inputs = draw_inputs(
                ghost.state.model, process, source, indices, stage, generator, cfg.train, torch.device("cpu")
            )
            ghost.step(inputs)

    return run


def _interleaved_times(kinds: dict[str, Callable[[int], None]], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each kind in each repeat, after one warm-up step each, the order rotated every repeat."""
    for fn in kinds.values():  # warm-up: first-call dispatch, AdamW state
        fn(1)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    names = list(kinds)
    for repeat in range(repeats):
        # rotate the order, so a load change within a round does not favour one kind
        for kind in names[repeat % len(names) :] + names[: repeat % len(names)]:
            started = time.perf_counter()
            kinds[kind](steps)
            times[kind].append((time.perf_counter() - started) / steps)
    return times


def time_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved non-DP / DP step times per grad-sample mode, update checks and the ε check for one stage."""
    cfg, stage, source, process, model = stage_setup(spec)
    modes = list(spec.get("modes", GRAD_SAMPLE_MODES))
    plain = new_state(model, cfg.train)
    private = {mode: new_state(copy.deepcopy(model), cfg.train) for mode in modes}
    pcfg = privacy_cfg(cfg)
    rate = sample_rate(cfg.train.batch_size, len(source))
    ghost = None
    if stage == "slice" and spec.get("ghost", True):
        ghost_state = new_state(copy.deepcopy(model), cfg.train)
        ghost = OpacusGhost(ghost_state, pcfg.max_grad_norm, float(pcfg.noise_multiplier or 0.0), len(source))
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {mode: PrivacyLedger.open(Path(tmp) / f"ledger-{mode}.json", pcfg) for mode in modes}
        kinds = {"non-DP": _plain_runner(plain, process, source, stage, cfg)}
        for mode in modes:
            mode_cfg = pcfg.model_copy(update={"grad_sample_mode": mode})
            kinds[mode] = _private_runner(private[mode], process, source, stage, cfg, mode_cfg, ledgers[mode])
        if ghost is not None:
            kinds["opacus-ghost"] = _ghost_runner(ghost, process, source, stage, cfg)
        times = _interleaved_times(kinds, spec["steps"], spec["repeats"])
        first = modes[0]
        dp_steps = private[first].step
        ledger_epsilon = ledgers[first].epsilon
        noise = ledgers[first].history[0][0]

    # correctness: each mode's clipped update (noise off) against the plain per-window reference
    generator = torch.Generator().manual_seed(1)
    inputs = draw_inputs(
        model, process, source, list(range(len(source))), stage, generator, cfg.train, torch.device("cpu")
    )
    clip = check_clip(model, inputs)
    differences = update_differences(model, inputs, modes, clip, ghost=ghost is not None)
    plain_median = statistics.median(times["non-DP"])
    return {
        "stage": stage,
        "size": cfg.data.image_size,
        "window": cfg.data.window,
        "batch": cfg.train.batch_size,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "s_per_step": times,
        "ratio": {kind: statistics.median(t) / plain_median for kind, t in times.items()},
        "pair_ratios": {kind: [d / p for d, p in zip(t, times["non-DP"], strict=True)] for kind, t in times.items()},
        "update_rel_diff": differences,
        "check_clip": clip,
        "auto_mode": resolve_grad_sample_mode(model, "auto"),
        "dp_steps": dp_steps,
        "noise_multiplier": noise,
        "sample_rate": rate,
        "ledger_epsilon": ledger_epsilon,
        # Opacus's own accountant, stepped once per DP step as Opacus's PrivacyEngine does
        "opacus_epsilon": opacus_epsilon([(noise, rate, dp_steps)], pcfg.delta),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the loaded model and data over ``steps`` + 1 steps of one kind."""
    cfg, stage, source, process, model = stage_setup(spec)
    state = new_state(model, cfg.train)
    pcfg = privacy_cfg(cfg)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", pcfg)
        baseline = reset_peak(device)
        if spec["dp"]:
            train_private(state, process, source, stage, 1 + spec["steps"], cfg.train, privacy_cfg=pcfg, ledger=ledger)
        else:
            train(state, process, source, stage, 1 + spec["steps"], cfg.train)
        peak = peak_bytes(device)
    return {"peak_mib": (peak - baseline) / 2**20}


def step_time_row(label: str, stage: str, result: dict[str, Any], peaks: dict[bool, dict[str, Any]]) -> list[str]:
    """The step-time table's row for one time-worker result and its peak-memory results (``{dp: result}``)."""
    if "error" in result:
        return [label, stage, *["-"] * 7, result["error"]]
    auto = result["auto_mode"]
    pairs = result["pair_ratios"][auto]
    memory = [p.get("peak_mib") for p in (peaks.get(False, {}), peaks.get(True, {}))]
    memory_ratio = f"{memory[1] / memory[0]:.2f}" if None not in memory and memory[0] else "-"
    return [
        label,
        stage,
        f"{result['batch']}x{result['window']} @ {result['size']}px",
        f"{statistics.median(result['s_per_step']['non-DP']):.3f}",
        f"{statistics.median(result['s_per_step'][auto]):.3f}",
        f"{result['ratio'][auto]:.2f}x ({min(pairs):.2f}-{max(pairs):.2f})",
        "met" if result["ratio"][auto] <= TARGET_RATIO else "not met",
        " / ".join(f"{m:.0f}" if m is not None else "-" for m in memory),
        memory_ratio,
        f"{result['ledger_epsilon']:.6f} / {result['opacus_epsilon']:.6f}",
        f"auto = {auto}; load {result['load_average']}",
    ]


def print_step_time_table(rows: list[list[str]]) -> None:
    """Print the step-time and peak-memory table (rows from ``step_time_row``)."""
    print("\n## DP-SGD (grad_sample_mode auto) vs non-DP step time and peak memory (target DP/non-DP <= 1.5x)\n")
    headers = ["config", "stage", "batch x W", "non-DP s/step", "DP s/step", "DP/non-DP (pair range)"]
    headers += ["target 1.5x", "peak RSS MiB non-DP / DP", "memory ratio", "ε ledger / Opacus RDP", "note"]
    print(markdown_table(headers, rows))
