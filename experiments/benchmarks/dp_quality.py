"""Quality cost of DP (stage 1): held-out validation loss after the same steps with and without DP.

On 8 training phantoms (Poisson rate batch/8 = 0.5) and 2 held-out phantoms of another seed:
validation loss (and that of the EMA model) after ``--quality-steps`` steps at ε in
``QUALITY_EPSILONS`` (``privacy.target_epsilon``) against non-DP, same steps, same seed.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks import markdown_table
from experiments.benchmarks.dp_setup import phantoms, privacy_cfg
from experiments.configs import resolve_config_path
from gem3d.config import load_config
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import Stage, new_state, train, validation_loss
from privacy.dp_sgd import train_private
from privacy.ledger import PrivacyLedger

QUALITY_EPSILONS = (1.0, 4.0, 8.0)


def quality_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Stage-1 validation loss after ``steps`` steps, non-DP and at each target ε."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    stage: Stage = "slice"
    steps = spec["steps"]
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


def print_quality_table(quality: dict[str, Any], steps: int) -> None:
    """Print the quality table for a ``quality_worker`` result (or its error) after ``steps`` steps."""
    print(f"\n## Quality cost of DP: stage 1, {steps} steps, 8 cases (q = 0.5), 2 held out\n")
    if "error" in quality:
        print(f"quality: {quality['error']}")
        return
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
