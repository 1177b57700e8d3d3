"""DP-SGD cost: step time, peak memory, ε bookkeeping and the quality cost of DP (issue 6, item 7).

On the tiny config (``--mid``: also 96x96 slices, window 16) with phantoms
(``write_phantom_dataset`` + ``load_volumes``), for stage 1 (``slice``) and stage 2 (``volume``):

1. **Step time**: ``gem3d.training.train`` and ``privacy.dp_sgd.train_private`` with each
   ``privacy.grad_sample_mode`` (``loop``, ``vmap``, ``hooks``) on copies of the same model, same
   batch size, in one process, interleaved (``--repeats`` x ``--steps`` steps each, after one
   warm-up step each, the order rotated every repeat) so a change in the machine's load hits all
   of them. Stage 1 also runs Opacus's own ghost clipping (``GradSampleModuleFastGradientClipping``,
   two backwards per step) in its native unit. The site has exactly ``batch_size`` volumes, so the
   Poisson rate is 1 and every DP batch is full size. The median DP/non-DP ratio of the ``auto``
   mode is compared with the issue's target (at most 1.5x).
2. **Correctness of each mode**: the update ``DPOptimizer`` takes (noise off, SGD, learning rate
   1) from each mode's per-sample gradients, against a reference built by one plain ``backward``
   per window, clipped and averaged by hand, with the clip bound at half the smallest window norm
   so every window is clipped. Opacus's ghost clipping clips per *slice* (what its layers see as
   a batch element), so it is expected to fail this check; it is timed for reference only.
3. **Peak memory**: each of (stage, DP or not) in a fresh subprocess (RSS high-water mark above
   the loaded model and data); the DP/non-DP ratio.
4. **ε bookkeeping**: seconds per ``PrivacyLedger.epsilon`` (a fresh RDP accounting of the whole
   history) and per ``ledger.check`` for histories of 1, 10 and 100 entries; and ε from the
   ledger after the timed DP steps against Opacus's ``RDPAccountant`` stepped once per DP step.
5. **Quality cost** (stage 1): validation loss on held-out phantoms after ``--quality-steps``
   steps at ε in {1, 4, 8} (``privacy.target_epsilon``) against non-DP, same steps, same seed.

    .venv/bin/python experiments/benchmarks/privacy.py [--mid] [--steps N] [--repeats R] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from experiments.benchmarks import MID, emit, machine, markdown_table, peak_bytes, reset_peak, run_worker
from experiments.configs import resolve_config_path
from gem3d.config import Config, PrivacyConfig, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import (
    DenoisingInputs,
    Stage,
    TrainState,
    draw_inputs,
    freeze_for_stage,
    new_state,
    per_sample_loss,
    train,
    validation_loss,
)
from privacy.dp_sgd import (
    GRAD_SAMPLE_MODES,
    per_sample_gradients,
    resolve_grad_sample_mode,
    sample_rate,
    train_private,
)
from privacy.ledger import PrivacyLedger

TARGET_RATIO = 1.5
UPDATE_TOLERANCE = 1e-4  # float32 sums in a different order; a wrong unit differs by O(1)
QUALITY_EPSILONS = (1.0, 4.0, 8.0)


def phantoms(cfg: Config, num_cases: int, seed: int) -> list[Volume]:
    """``num_cases`` phantom volumes at the config's slice size, depth 2W + 8 (whole windows after cropping)."""
    size, window = cfg.data.image_size, cfg.data.window
    with tempfile.TemporaryDirectory() as tmp:
        data = write_phantom_dataset(
            Path(tmp) / "p", num_cases, (size, size, 2 * window + 8), cfg.data.num_labels, seed
        )
        return load_volumes(data, cfg.data)


def stand_in_base(model: torch.nn.Module) -> None:
    """Give a fresh stage-2 model's frozen, all-zero parameters small random values.

    MONAI zero-initialises the U-Net's output conv, so a stage-2 model inflated from an untrained
    base gives its slice-axis layers exactly zero gradients; the real stage 2 starts from a
    trained base. This stands in for one, so clipping and the vmap/loop check see real gradients.
    """
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and not p.any():
                p.normal_(std=0.02)


def privacy_cfg(cfg: Config, **changes: Any) -> PrivacyConfig:
    """The config's privacy section, enabled, with a budget no benchmark reaches."""
    return cfg.privacy.model_copy(update={"enabled": True, "budget_epsilon": 1e6, **changes})


def _stage_setup(spec: dict[str, Any]) -> tuple[Config, Stage, WindowSource, Any, torch.nn.Module]:
    """A worker's config, stage, phantom source, noise process and frozen-as-in-training model."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    stage = spec["stage"]
    volumes = phantoms(cfg, cfg.train.batch_size, seed=0)
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    model = build_model(stage, cfg)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    stand_in_base(model)
    return cfg, stage, source, noise_process(cfg.diffusion), model


def reference_update(model: torch.nn.Module, inputs: DenoisingInputs, clip: float) -> list[torch.Tensor]:
    """The DP-SGD update (noise off, SGD lr 1) from per-window gradients computed the plain way.

    One ``backward`` per window (the privacy unit), each window's gradient scaled to norm at most
    ``clip``, summed and divided by the batch size, negated: what every mode must reproduce.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for index in range(int(inputs.noisy.shape[0])):
        model.zero_grad(set_to_none=True)
        one = DenoisingInputs(*(None if v is None else v[index : index + 1] for v in dataclasses.astuple(inputs)))
        per_sample_loss(model, one).sum().backward()
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
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


def time_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved non-DP / DP step times per grad-sample mode, update checks and the ε check for one stage."""
    cfg, stage, source, process, model = _stage_setup(spec)
    steps = spec["steps"]
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

        def run_plain(n: int) -> None:
            train(plain, process, source, stage, plain.step + n, cfg.train)

        def private_runner(mode: str) -> Callable[[int], None]:
            mode_cfg = pcfg.model_copy(update={"grad_sample_mode": mode})

            def run(n: int) -> None:
                state = private[mode]
                train_private(
                    state,
                    process,
                    source,
                    stage,
                    state.step + n,
                    cfg.train,
                    privacy_cfg=mode_cfg,
                    ledger=ledgers[mode],
                )

            return run

        ghost_generator = torch.Generator().manual_seed(cfg.train.seed)

        def run_ghost(n: int) -> None:
            assert ghost is not None
            for _ in range(n):  # Poisson rate 1 here: every volume, as in the other DP runs
                indices = list(range(len(source)))
                ghost.step(
                    draw_inputs(
                        ghost.state.model,
                        process,
                        source,
                        indices,
                        stage,
                        ghost_generator,
                        cfg.train,
                        torch.device("cpu"),
                    )
                )

        kinds: dict[str, Callable[[int], None]] = {"non-DP": run_plain}
        kinds.update({mode: private_runner(mode) for mode in modes})
        if ghost is not None:
            kinds["opacus-ghost"] = run_ghost
        for fn in kinds.values():  # warm-up: first-call dispatch, AdamW state
            fn(1)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        names = list(kinds)
        for repeat in range(spec["repeats"]):
            # rotate the order, so a load change within a round does not favour one kind
            for kind in names[repeat % len(names) :] + names[: repeat % len(names)]:
                started = time.perf_counter()
                kinds[kind](steps)
                times[kind].append((time.perf_counter() - started) / steps)
        first = modes[0]
        dp_steps = private[first].step
        ledger_epsilon = ledgers[first].epsilon
        history = ledgers[first].history
    # Opacus's own accountant, stepped once per DP step as Opacus's PrivacyEngine does
    opacus = RDPAccountant()
    for _ in range(dp_steps):
        opacus.step(noise_multiplier=history[0][0], sample_rate=rate)
    opacus_epsilon = opacus.get_epsilon(delta=pcfg.delta)

    # correctness: each mode's clipped update (noise off) against the plain per-window reference
    generator = torch.Generator().manual_seed(1)
    inputs = draw_inputs(
        model, process, source, list(range(len(source))), stage, generator, cfg.train, torch.device("cpu")
    )
    clip = 0.5 * float(window_norms(model, inputs).min())  # every window clipped, so clipping is tested
    reference = reference_update(model, inputs, clip)
    differences = {mode: update_difference(mode_update(model, inputs, mode, clip), reference) for mode in modes}
    if ghost is not None:
        differences["opacus-ghost"] = update_difference(ghost_update(model, inputs, clip), reference)
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
        "noise_multiplier": history[0][0],
        "sample_rate": rate,
        "ledger_epsilon": ledger_epsilon,
        "opacus_epsilon": opacus_epsilon,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the loaded model and data over ``steps`` + 1 steps of one kind."""
    cfg, stage, source, process, model = _stage_setup(spec)
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


def quality_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Stage-1 validation loss after ``steps`` steps, non-DP and at each target ε."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    stage, steps = "slice", spec["steps"]
    # 8 training cases (Poisson rate batch/8 = 0.5) and 2 held-out cases of other phantoms
    train_source = WindowSource(phantoms(cfg, 8, seed=0), cfg.data.window, cfg.train.informed_from)
    held_out = WindowSource(phantoms(cfg, 2, seed=99), cfg.data.window, cfg.train.informed_from)
    process = noise_process(cfg.diffusion)
    initial = build_model(stage, cfg)
    rows = []
    for epsilon in (None, *QUALITY_EPSILONS):
        state = new_state(copy.deepcopy(initial), cfg.train, seed=cfg.train.seed)
        row: dict[str, Any] = {"target_epsilon": epsilon}
        if epsilon is None:
            metrics = train(state, process, train_source, stage, steps, cfg.train)
        else:
            pcfg = privacy_cfg(cfg, target_epsilon=epsilon)
            with tempfile.TemporaryDirectory() as tmp:
                ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", pcfg)
                metrics = train_private(
                    state, process, train_source, stage, steps, cfg.train, privacy_cfg=pcfg, ledger=ledger
                )
            row.update(epsilon=metrics["epsilon"], noise_multiplier=metrics["noise_multiplier"])
        row["train_loss"] = metrics["loss"]
        row["val_loss"] = validation_loss(state.model, process, held_out, stage, cfg.train, batches=8, seed=7)
        row["val_loss_ema"] = validation_loss(state.ema.module, process, held_out, stage, cfg.train, batches=8, seed=7)
        rows.append(row)
    return {"steps": steps, "rows": rows}


def epsilon_costs(repeats: int) -> list[dict[str, Any]]:
    """Seconds per ``ledger.epsilon`` (uncached) and per ``ledger.check`` for histories of 1, 10 and 100 entries."""
    pcfg = PrivacyConfig(enabled=True, budget_epsilon=1e6)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for entries in (1, 10, 100):
            # alternating noise multipliers so entries do not merge: one entry per federated round
            history = [(1.0 + 0.1 * (i % 2), 0.5, 10) for i in range(entries)]
            spends = [
                {"id": str(i), "label": "", "noise_multiplier": s, "sample_rate": q, "steps": n, "status": "spent"}
                for i, (s, q, n) in enumerate(history)
            ]
            ledger = PrivacyLedger(
                Path(tmp) / "l.json", ledger_id="bench", accountant="rdp", delta=pcfg.delta, budget_epsilon=1e6,
                spends=spends,
            )  # fmt: skip
            epsilon_s, check_s = [], []
            for _ in range(repeats if entries <= 10 else 1):  # 100 entries take tens of seconds
                ledger._epsilon = None  # drop the cache: time a fresh accounting, as after every record
                started = time.perf_counter()
                epsilon = ledger.epsilon
                epsilon_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                ledger.check(10, 1.0, 0.5)
                check_s.append(time.perf_counter() - started)
            opacus = RDPAccountant()
            for sigma, q, steps in history:
                for _ in range(steps):
                    opacus.step(noise_multiplier=sigma, sample_rate=q)
            out.append(
                {
                    "entries": entries,
                    "steps": sum(s for _, _, s in history),
                    "epsilon_ms": 1e3 * statistics.median(epsilon_s),
                    "check_ms": 1e3 * statistics.median(check_s),
                    "ledger_epsilon": epsilon,
                    "opacus_epsilon": opacus.get_epsilon(delta=pcfg.delta),
                }
            )
    return out


WORKERS = {"time": time_worker, "peak": peak_worker, "quality": quality_worker}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument("--mid", action="store_true", help="also the mid configuration: 96x96 slices, window 16")
    parser.add_argument("--mid-only", action="store_true", help="the mid configuration only")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat and kind (default 3)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats (default 4)")
    parser.add_argument("--mid-steps", type=int, default=1, help="timed steps per repeat at the mid config (default 1)")
    parser.add_argument("--mid-repeats", type=int, default=3, help="interleaved repeats at the mid config (default 3)")
    parser.add_argument("--no-timing", action="store_true", help="skip step times, modes and memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--no-epsilon", action="store_true", help="skip the ε bookkeeping timings")
    parser.add_argument(
        "--quality-steps", type=int, default=100, help="stage-1 steps per quality run; 0 skips (default 100)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        emit(WORKERS[spec["kind"]](spec))
        return 0
    torch.set_num_threads(args.threads)
    script = Path(__file__)
    configs: list[tuple[str, dict[str, Any]]] = [("tiny", {})]
    if args.mid or args.mid_only:
        configs.append(("mid (96x96, W=16)", MID))
    if args.mid_only:
        configs = configs[1:]
    base = {"config": args.config, "threads": args.threads, "steps": args.steps, "repeats": args.repeats}
    results: dict[str, Any] = {"time": [], "peak": [], "quality": None, "epsilon": None}
    time_rows, mode_rows = [], []
    for label, overrides in [] if args.no_timing else configs:
        for stage in ("slice", "volume"):
            spec = {**base, "kind": "time", "overrides": overrides, "stage": stage}
            if overrides:  # mid: fewer steps, and no Opacus ghost (it fails the update check at tiny already)
                spec.update(steps=args.mid_steps, repeats=args.mid_repeats, ghost=False)
            result = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
            peaks = {}
            if not args.no_memory:
                peaks = {
                    dp: run_worker(script, {**spec, "kind": "peak", "dp": dp}, args.timeout, rss_cap_bytes=None)
                    for dp in (False, True)
                }
                results["peak"].append({"config": label, "stage": stage, "plain": peaks[False], "dp": peaks[True]})
            results["time"].append({"config": label, **result})
            print(f"  {label} {stage}: done", file=sys.stderr, flush=True)
            if "error" in result:
                time_rows.append([label, stage, *["-"] * 7, result["error"]])
                continue
            auto = result["auto_mode"]
            memory = [p.get("peak_mib") for p in (peaks.get(False, {}), peaks.get(True, {}))]
            memory_ratio = f"{memory[1] / memory[0]:.2f}" if None not in memory and memory[0] else "-"
            time_rows.append(
                [
                    label,
                    stage,
                    f"{result['batch']}x{result['window']} @ {result['size']}px",
                    f"{statistics.median(result['s_per_step']['non-DP']):.3f}",
                    f"{statistics.median(result['s_per_step'][auto]):.3f}",
                    f"{result['ratio'][auto]:.2f}x ({min(result['pair_ratios'][auto]):.2f}-"
                    f"{max(result['pair_ratios'][auto]):.2f})",
                    "met" if result["ratio"][auto] <= TARGET_RATIO else "not met",
                    " / ".join(f"{m:.0f}" if m is not None else "-" for m in memory),
                    memory_ratio,
                    f"{result['ledger_epsilon']:.6f} / {result['opacus_epsilon']:.6f}",
                    f"auto = {auto}; load {result['load_average']}",
                ]
            )
            for kind, ratio in result["ratio"].items():
                if kind == "non-DP":
                    continue
                difference = result["update_rel_diff"][kind]
                mode_rows.append(
                    [
                        label,
                        stage,
                        kind,
                        f"{statistics.median(result['s_per_step'][kind]):.3f}",
                        f"{ratio:.2f}x ({min(result['pair_ratios'][kind]):.2f}-{max(result['pair_ratios'][kind]):.2f})",
                        f"{difference:.1e}",
                        "yes" if difference <= UPDATE_TOLERANCE else "no",
                    ]
                )
    eps = [] if args.no_epsilon else epsilon_costs(repeats=max(args.repeats, 5))
    results["epsilon"] = eps
    quality = None
    if args.quality_steps > 0:
        spec = {**base, "kind": "quality", "overrides": {}, "steps": args.quality_steps}
        quality = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
        results["quality"] = quality

    info = machine(args.threads)
    print(f"# privacy: {json.dumps(info)}")
    print(
        f"# {args.repeats} interleaved repeats x {args.steps} steps ({args.mid_repeats} x {args.mid_steps} at the "
        "mid config), after 1 warm-up step each; "
        f"DP: Poisson rate 1 (site = one batch), noise 1.0, clip 1.0, RDP accountant"
    )
    if time_rows:
        print("\n## DP-SGD (grad_sample_mode auto) vs non-DP step time and peak memory (target DP/non-DP <= 1.5x)\n")
        headers = ["config", "stage", "batch x W", "non-DP s/step", "DP s/step", "DP/non-DP (pair range)"]
        headers += ["target 1.5x", "peak RSS MiB non-DP / DP", "memory ratio", "ε ledger / Opacus RDP", "note"]
        print(markdown_table(headers, time_rows))
        print(
            "\n## Grad-sample modes: DP step time vs non-DP, and the clipped update (noise off) against "
            f"the plain per-window reference (correct: relative difference <= {UPDATE_TOLERANCE:g})\n"
        )
        headers = ["config", "stage", "mode", "DP s/step", "DP/non-DP (pair range)", "update rel. diff", "correct"]
        print(markdown_table(headers, mode_rows))
    if eps:
        print("\n## ε bookkeeping cost (RDP, δ = 1e-5; history entries of 10 steps at q = 0.5)\n")
        print(
            markdown_table(
                [
                    "history entries",
                    "steps",
                    "ledger.epsilon ms",
                    "ledger.check ms",
                    "ε ledger",
                    "ε Opacus RDPAccountant",
                ],
                [
                    [
                        e["entries"],
                        e["steps"],
                        f"{e['epsilon_ms']:.2f}",
                        f"{e['check_ms']:.2f}",
                        f"{e['ledger_epsilon']:.6f}",
                        f"{e['opacus_epsilon']:.6f}",
                    ]
                    for e in eps
                ],
            )
        )
    if quality is not None:
        print(f"\n## Quality cost of DP: stage 1, {args.quality_steps} steps, 8 cases (q = 0.5), 2 held out\n")
        if "error" in quality:
            print(f"quality: {quality['error']}")
        else:
            rows = [
                [
                    "non-DP" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}",
                    "-" if r["target_epsilon"] is None else f"{r['epsilon']:.3f}",
                    "-" if r["target_epsilon"] is None else f"{r['noise_multiplier']:.3f}",
                    f"{r['train_loss']:.4f}",
                    f"{r['val_loss']:.4f}",
                    f"{r['val_loss_ema']:.4f}",
                ]
                for r in quality["rows"]
            ]
            headers = ["target ε", "ε spent", "noise σ", "train loss", "held-out loss", "held-out loss (EMA)"]
            print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
