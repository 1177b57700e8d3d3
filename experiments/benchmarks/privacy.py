"""DP-SGD cost: step time, peak memory, ε bookkeeping and the quality cost of DP (issue 6, item 7).

On the tiny config (``--mid``: also 96x96 slices, window 16) with phantoms
(``write_phantom_dataset`` + ``load_volumes``), for stage 1 (``slice``) and stage 2 (``volume``):

1. **Step time**: ``gem3d.training.train`` and ``privacy.dp_sgd.train_private`` on two copies of
   the same model, same batch size, in one process, interleaved (``--repeats`` x ``--steps`` steps
   each, after one warm-up step each) so a change in the machine's load hits both. The site has
   exactly ``batch_size`` volumes, so the Poisson rate is 1 and every DP batch is full size.
   The median DP/non-DP ratio is compared with the issue's target (at most 1.5x).
2. **Grad-sample modes**: ``per_sample_gradients`` with ``vmap`` (``torch.func``, what
   ``train_private`` uses) against ``loop`` (one backward per sample), with the largest
   difference between their gradients. Opacus's hook and ghost-clipping modes are not run: they
   compute per-*slice* gradients on this network (see ``privacy/dp_sgd.py``), the wrong privacy unit.
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
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opacus.accountants import RDPAccountant

from experiments.benchmarks import emit, machine, markdown_table, peak_bytes, reset_peak, run_worker
from experiments.commands.common import resolve_config_path
from gem3d.config import Config, PrivacyConfig, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.runs import build_model
from gem3d.training import Stage, draw_inputs, freeze_for_stage, new_state, train, validation_loss
from privacy.dp_sgd import per_sample_gradients, sample_rate, train_private
from privacy.ledger import PrivacyLedger

MID = {"data.image_size": 96, "data.window": 16}
TARGET_RATIO = 1.5
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
    """A worker's config, stage, phantom source, scheduler and frozen-as-in-training model."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    stage = spec["stage"]
    volumes = phantoms(cfg, cfg.train.batch_size, seed=0)
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    model = build_model(stage, cfg)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    stand_in_base(model)
    return cfg, stage, source, train_scheduler(cfg.diffusion), model


def time_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved DP / non-DP step times, grad-sample modes and the ε check for one stage."""
    cfg, stage, source, scheduler, model = _stage_setup(spec)
    steps = spec["steps"]
    plain, private = new_state(model, cfg.train), new_state(copy.deepcopy(model), cfg.train)
    pcfg = privacy_cfg(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", pcfg)
        rate = sample_rate(cfg.train.batch_size, len(source))

        def run_plain(n: int) -> None:
            train(plain, scheduler, source, stage, plain.step + n, cfg.train)

        def run_private(n: int) -> None:
            train_private(
                private, scheduler, source, stage, private.step + n, cfg.train, privacy_cfg=pcfg, ledger=ledger
            )

        run_plain(1)  # warm-up: first-call dispatch, AdamW state
        run_private(1)
        plain_s, private_s = [], []
        for repeat in range(spec["repeats"]):
            # alternate which goes first, so a load change within a pair does not favour one side
            order = [(run_plain, plain_s), (run_private, private_s)]
            for fn, times in order if repeat % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                fn(steps)
                times.append((time.perf_counter() - started) / steps)
        dp_steps = private.step
        ledger_epsilon = ledger.epsilon
        history = ledger.history
    # Opacus's own accountant, stepped once per DP step as Opacus's PrivacyEngine does
    opacus = RDPAccountant()
    for _ in range(dp_steps):
        opacus.step(noise_multiplier=history[0][0], sample_rate=rate)
    opacus_epsilon = opacus.get_epsilon(delta=pcfg.delta)

    # grad-sample modes on the same batch
    generator = torch.Generator().manual_seed(1)
    indices = list(range(len(source)))
    inputs = draw_inputs(model, scheduler, source, indices, stage, generator, cfg.train, torch.device("cpu"))
    modes: dict[str, list[float]] = {"vmap": [], "loop": []}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(spec["repeats"]):
        for mode, times in modes.items():
            started = time.perf_counter()
            grads[mode], _ = per_sample_gradients(model, inputs, mode)  # type: ignore[arg-type]
            times.append(time.perf_counter() - started)
    difference = max(float((grads["vmap"][n] - grads["loop"][n]).abs().max()) for n in grads["vmap"])
    scale = max(float(grads["loop"][n].abs().max()) for n in grads["loop"])
    return {
        "stage": stage,
        "size": cfg.data.image_size,
        "window": cfg.data.window,
        "batch": cfg.train.batch_size,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "plain_s_per_step": plain_s,
        "dp_s_per_step": private_s,
        "ratio": statistics.median(private_s) / statistics.median(plain_s),
        "pair_ratios": [d / p for d, p in zip(private_s, plain_s, strict=True)],
        "vmap_s": statistics.median(modes["vmap"]),
        "loop_s": statistics.median(modes["loop"]),
        "vmap_loop_max_abs_diff": difference,
        "grad_max_abs": scale,
        "dp_steps": dp_steps,
        "noise_multiplier": history[0][0],
        "sample_rate": rate,
        "ledger_epsilon": ledger_epsilon,
        "opacus_epsilon": opacus_epsilon,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the loaded model and data over ``steps`` + 1 steps of one kind."""
    cfg, stage, source, scheduler, model = _stage_setup(spec)
    state = new_state(model, cfg.train)
    pcfg = privacy_cfg(cfg)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", pcfg)
        baseline = reset_peak(device)
        if spec["dp"]:
            train_private(
                state, scheduler, source, stage, 1 + spec["steps"], cfg.train, privacy_cfg=pcfg, ledger=ledger
            )
        else:
            train(state, scheduler, source, stage, 1 + spec["steps"], cfg.train)
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
    scheduler = train_scheduler(cfg.diffusion)
    initial = build_model(stage, cfg)
    rows = []
    for epsilon in (None, *QUALITY_EPSILONS):
        state = new_state(copy.deepcopy(initial), cfg.train, seed=cfg.train.seed)
        row: dict[str, Any] = {"target_epsilon": epsilon}
        if epsilon is None:
            metrics = train(state, scheduler, train_source, stage, steps, cfg.train)
        else:
            pcfg = privacy_cfg(cfg, target_epsilon=epsilon)
            with tempfile.TemporaryDirectory() as tmp:
                ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", pcfg)
                metrics = train_private(
                    state, scheduler, train_source, stage, steps, cfg.train, privacy_cfg=pcfg, ledger=ledger
                )
            row.update(epsilon=metrics["epsilon"], noise_multiplier=metrics["noise_multiplier"])
        row["train_loss"] = metrics["loss"]
        row["val_loss"] = validation_loss(state.model, scheduler, held_out, stage, cfg.train, batches=8, seed=7)
        row["val_loss_ema"] = validation_loss(
            state.ema.module, scheduler, held_out, stage, cfg.train, batches=8, seed=7
        )
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
            ledger = PrivacyLedger(Path(tmp) / "l.json", pcfg, history, [])
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
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat and kind (default 3)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats (default 4)")
    parser.add_argument(
        "--quality-steps", type=int, default=20, help="stage-1 steps per quality run; 0 skips (default 20)"
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
    if args.mid:
        configs.append(("mid (96x96, W=16)", MID))
    base = {"config": args.config, "threads": args.threads, "steps": args.steps, "repeats": args.repeats}
    results: dict[str, Any] = {"time": [], "peak": [], "quality": None, "epsilon": None}
    time_rows, mode_rows = [], []
    for label, overrides in configs:
        for stage in ("slice", "volume"):
            spec = {**base, "kind": "time", "overrides": overrides, "stage": stage}
            result = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
            peaks = {
                dp: run_worker(script, {**spec, "kind": "peak", "dp": dp}, args.timeout, rss_cap_bytes=None)
                for dp in (False, True)
            }
            results["time"].append({"config": label, **result})
            results["peak"].append({"config": label, "stage": stage, "plain": peaks[False], "dp": peaks[True]})
            print(f"  {label} {stage}: done", file=sys.stderr, flush=True)
            if "error" in result:
                time_rows.append([label, stage, *["-"] * 8, result["error"]])
                continue
            memory = [p.get("peak_mib") for p in (peaks[False], peaks[True])]
            memory_ratio = f"{memory[1] / memory[0]:.2f}" if None not in memory and memory[0] else "-"
            time_rows.append(
                [
                    label,
                    stage,
                    f"{result['batch']}x{result['window']} @ {result['size']}px",
                    f"{statistics.median(result['plain_s_per_step']):.3f}",
                    f"{statistics.median(result['dp_s_per_step']):.3f}",
                    f"{result['ratio']:.2f}x ({min(result['pair_ratios']):.2f}-{max(result['pair_ratios']):.2f})",
                    "met" if result["ratio"] <= TARGET_RATIO else "not met",
                    " / ".join(f"{m:.0f}" if m is not None else "err" for m in memory),
                    memory_ratio,
                    f"{result['ledger_epsilon']:.6f} / {result['opacus_epsilon']:.6f}",
                    f"load {result['load_average']}",
                ]
            )
            mode_rows.append(
                [
                    label,
                    stage,
                    f"{result['vmap_s']:.3f}",
                    f"{result['loop_s']:.3f}",
                    f"{result['loop_s'] / result['vmap_s']:.2f}x",
                    f"{result['vmap_loop_max_abs_diff']:.1e} (max |g| {result['grad_max_abs']:.1e})",
                ]
            )
    eps = epsilon_costs(repeats=max(args.repeats, 5))
    results["epsilon"] = eps
    quality = None
    if args.quality_steps > 0:
        spec = {**base, "kind": "quality", "overrides": {}, "steps": args.quality_steps}
        quality = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
        results["quality"] = quality

    info = machine(args.threads)
    print(f"# privacy: {json.dumps(info)}")
    print(
        f"# {args.repeats} interleaved repeats x {args.steps} steps, after 1 warm-up step each; "
        f"DP: Poisson rate 1 (site = one batch), noise 1.0, clip 1.0, RDP accountant"
    )
    print("\n## DP-SGD vs non-DP step time and peak memory (target DP/non-DP <= 1.5x)\n")
    headers = ["config", "stage", "batch x W", "non-DP s/step", "DP s/step", "DP/non-DP (pair range)"]
    headers += ["target 1.5x", "peak RSS MiB non-DP / DP", "memory ratio", "ε ledger / Opacus RDP", "note"]
    print(markdown_table(headers, time_rows))
    print("\n## Per-sample gradients: vmap (used) vs loop, same batch\n")
    print(markdown_table(["config", "stage", "vmap s", "loop s", "loop/vmap", "max |vmap - loop|"], mode_rows))
    print("\n## ε bookkeeping cost (RDP, δ = 1e-5; history entries of 10 steps at q = 0.5)\n")
    print(
        markdown_table(
            ["history entries", "steps", "ledger.epsilon ms", "ledger.check ms", "ε ledger", "ε Opacus RDPAccountant"],
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
