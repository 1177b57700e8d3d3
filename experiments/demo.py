"""The main job (``gem3d demo`` / ``make demo``): the whole story on a 3-site cohort, on CPU.

1. build the 3-site demo cohort (MNI152 anatomy, deformed; site-specific scanner character);
   pre-train the slice and informed stages on a separate public set (no site's patients);
2. federated training of all three stages with DP-SGD on at every site (Flower simulation),
   starting from the public model; each hospital first writes its own privacy policy, which the
   server's request must meet;
3. a privacy release of an enhanced cohort from one site (generated informed slices, edited
   masks, the model's privacy record checked, and a federated audit round in which every site
   audits the candidates against its own patients, before anything is written);
4. a de-enhancement across the sites with one reference slice;
5. the memorization audit, with a membership-inference test on the model;
6. the evaluation against baselines;
7. everything tracked in MLflow (a local store in the output folder).

Each step does what the ``gem3d`` command a user would run does, by calling that command's typed
function (``experiments.commands.train.run_train`` and the like, the same code the CLI runs after
parsing its options); the federated training is the Flower simulation the ``flwr run .`` app runs.
The demo only chains the steps and prints a summary. The numbers are those of a tiny model trained
for minutes on a few deformed copies of one template: they show the machinery end to end, not
clinical quality.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from experiments.commands.audit import AuditOptions, run_audit
from experiments.commands.deenhance import DeenhanceOptions, run_deenhance
from experiments.commands.demo_data import DemoDataOptions, run_demo_data
from experiments.commands.evaluate import EvaluateOptions, run_evaluate
from experiments.commands.release import ReleaseOptions, run_release
from experiments.commands.runner import report_errors
from experiments.commands.train import NAME as TRAIN
from experiments.commands.train import TrainOptions, run_train
from experiments.previews import loss_curve_png
from experiments.tracking import Tracker, ui_command
from gem3d.errors import Gem3dError
from gem3d.training import Stage

# The demo's settings on top of the tiny config: small enough for ~15 minutes on 2 CPU cores.
DEMO_SET = (
    "federation.rounds_slice=3 federation.rounds_volume=2 federation.rounds_informed=2 "
    "federation.local_steps=15 train.batch_size=2 train.lr=1e-4 "
    "privacy.enabled=true privacy.noise_multiplier=1.2 privacy.budget_epsilon=8 privacy.max_grad_norm=1.0 "
    "diffusion.inference_steps=10"
)


# The test suite's setting: 2 sites, a micro network, one round per stage, two baselines skipped.
SMALL_SET = (
    "data.image_size=16 data.window=4 model.channels=8,16 model.attention_levels=false,true "
    "model.norm_num_groups=4 model.num_head_channels=8 informed.channels=8,16 "
    "informed.attention_levels=false,true informed.norm_num_groups=4 informed.num_head_channels=8 "
    "informed.position_bins=8 federation.rounds_slice=1 federation.rounds_volume=1 federation.rounds_informed=1 "
    "federation.local_steps=2 diffusion.inference_steps=3 "
    "privacy.budget_epsilon=20"  # 2-4 patients per site cannot train at epsilon <= 8
)


# Pre-training on public data: no DP (no patient data), the tiny config's own learning rate.


def lowest_quantile(cases: int) -> float:
    """The lowest audit quantile ``cases`` reference patients can place (``AuditSettings``: ceil(1 / q) <= cases).

    The demo's sites hold a handful of patients, far fewer than the 20 the default 0.05 needs, so
    its audits use the lowest quantile they can honestly place, and their reports say which.
    """
    return math.ceil(100 / cases) / 100


PRETRAIN_SET = "privacy.enabled=false train.batch_size=4 train.lr=1e-3"
# The stages pre-trained on public data (``DemoSettings.pretrain_steps``, ``mask_only_steps``).
PRETRAIN_STAGES: tuple[Stage, Stage] = ("slice", "informed")
MASK_ONLY_STAGES: tuple[Stage, Stage] = ("slice", "volume")
# The public pre-trained weights that ship with the project (experiments/pretrained/make.py makes
# them; `make pretrained` re-creates them): the demo starts from them when they fit its settings.
SHIPPED = Path(__file__).resolve().parent / "pretrained" / "demo"
SHIPPED_MANIFEST = "PRETRAINED.json"


def downstream_question(options: EvaluateOptions, real_pool: Path) -> EvaluateOptions:
    """``options`` with the downstream question at the demo's size, asked of the real pool ``real_pool``.

    site_0 holds 2 labelled cases; do GEM-3D's synthetic volumes (and, for comparison, the
    mask-only baseline's) make a converged segmenter better on the held-out cases of every site?
    3 paired seeds, each with its own validation cases from site_0.
    """
    return replace(
        options,
        arms="gem3d,mask-only",
        real_counts="2",
        multipliers="0,2",
        seeds="0,1,2",
        downstream_steps=2000,
        downstream_data=real_pool,
    )


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is: the cohort, the gem3d overrides for the federated run, evaluate's options.

    ``public_cases`` and ``pretrain_steps`` (slice, informed) size the public pre-training: DP-SGD
    on a handful of patients per site cannot train a diffusion model from scratch (the noise is
    ~0.6 per coordinate of a 281 k-parameter gradient clipped to norm 1, measured loss 0.91 =
    no learning), so, as in practice, the sites fine-tune a model pre-trained on public data.
    """

    sites: int = 3
    cases_per_site: int = 20
    test_per_site: int = 4
    size: int = 32
    overrides: str = DEMO_SET
    quick_evaluation: bool = True
    """evaluate's ``quick``: its CPU smoke setting (the report lists every reduction)."""
    baselines: str = EvaluateOptions.baselines
    """evaluate's ``baselines``: all three by default."""
    downstream: bool = True
    """the downstream question (``downstream_question``); False: evaluate's ``no_downstream``."""
    public_sites: int = 4
    public_cases: int = 4
    pretrain_steps: tuple[int, int] = (1000, 1200)
    mask_only_steps: tuple[int, int] = (1000, 150)
    shipped: Path | None = SHIPPED
    config: str = "tiny"
    """the bundled config under ``overrides``: ``tiny``, or ``tiny_latent`` for the latent variant."""
    autoencoder_steps: int = 0
    """a latent demo's stage 0, pre-trained on the public data first (0: a pixel-space demo)."""

    @property
    def latent(self) -> bool:
        return self.autoencoder_steps > 0

    def recorded(self) -> dict[str, Any]:
        """What a demo folder was made with: a re-run must use the same (``check_demo_folder``)."""
        return {"config": self.config, "overrides": self.overrides, "sites": self.sites, "size": self.size}


SMALL = DemoSettings(
    sites=2,
    cases_per_site=4,
    test_per_site=1,
    size=24,
    overrides=f"{DEMO_SET} {SMALL_SET}",
    baselines="mask-only,no-overlap",
    downstream=False,
    public_sites=2,
    public_cases=1,
    pretrain_steps=(4, 2),
    mask_only_steps=(4, 2),
    shipped=None,
)


# The latent variant (``gem3d demo --latent``): the same story in the latent space of a slice
# autoencoder (tiny_latent: 32x32 slices -> 4 x 8 x 8 latents). Stage 0 is pre-trained on the
# public data with the other public stages and stays frozen in the federated rounds (the sites
# fine-tune the denoiser and the informed generator on latents, under DP-SGD).
LATENT_SET = f"{DEMO_SET} federation.rounds_autoencoder=0"
LATENT = replace(DemoSettings(), config="tiny_latent", overrides=LATENT_SET, autoencoder_steps=600, shipped=None)
SMALL_LATENT = replace(
    SMALL,
    config="tiny_latent",
    overrides=f"{LATENT_SET} {SMALL_SET} autoencoder.channels=8,8 autoencoder.norm_num_groups=4",
    autoencoder_steps=4,
)


@dataclass
class DemoState:
    out: Path
    settings: DemoSettings
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def run(self) -> Path:
        return self.out / "federated"

    @property
    def public(self) -> Path:
        return self.out / "public"

    @property
    def pretrained(self) -> Path:
        return self.out / "pretrained"

    @property
    def mask_only(self) -> Path:
        return self.out / "pretrained_mask_only"


def _step(state: DemoState, index: int, total: int, title: str, work: Callable[[], None]) -> None:
    print(f"\n[{index}/{total}] {title}", flush=True)
    started = time.perf_counter()
    work()
    state.timings[title] = time.perf_counter() - started
    print(f"[{index}/{total}] done in {state.timings[title]:.0f} s", flush=True)


def build_cohort(state: DemoState) -> None:
    settings = state.settings
    if (state.data / "cohort.json").exists():
        return  # a re-run of the demo keeps its cohort
    run_demo_data(
        DemoDataOptions(
            out=state.data,
            sites=settings.sites,
            cases_per_site=settings.cases_per_site,
            test_per_site=settings.test_per_site,
            size=settings.size,
            seed=0,
        )
    )


def shipped_weights(settings: DemoSettings) -> dict[str, Any] | None:
    """The manifest of the shipped pre-trained weights if they were made for these settings, else None.

    They fit when they were trained with the demo's overrides (the network and diffusion recipe)
    at its slice size. Each file's sha256 is checked against the manifest: a changed file is refused.
    """
    if settings.shipped is None or not (settings.shipped / SHIPPED_MANIFEST).exists():
        return None
    manifest = json.loads((settings.shipped / SHIPPED_MANIFEST).read_text())
    if manifest.get("overrides") != settings.overrides or manifest.get("data", {}).get("size") != settings.size:
        return None
    from gem3d.checkpoint import file_sha256

    for name, digest in manifest["files"].items():
        if file_sha256(settings.shipped / name) != digest:
            raise Gem3dError(
                f"{settings.shipped / name}: its sha256 differs from {SHIPPED_MANIFEST}; "
                "re-create the shipped weights with `make pretrained`"
            )
    return manifest


def pretrain_public(state: DemoState, tracking: Path) -> None:
    """The public pre-trained models: the shipped ones when they fit, else trained here on public data.

    Shipped (``experiments/pretrained/demo``): the slice and informed stages and the mask-only
    baseline, made by ``experiments/pretrained/make.py`` from the public demo data, with the
    recipe recorded in their manifest. Otherwise: a public dataset (its own scanner, no site's
    patients) and the slice and informed stages trained on it here.

    The mask-only baseline (``model.informed_slice=false``) pre-trains on the same public data, for
    the same slice steps, in a child process on the second core (``_train_in_child``, killed if the
    main pre-training fails), so the evaluation compares GEM-3D with a baseline that had the same start.
    """
    settings = state.settings
    manifest = shipped_weights(settings)
    if manifest is not None:
        _copy_shipped(state, manifest)
        return
    if not state.public.exists():
        run_demo_data(
            DemoDataOptions(
                out=state.public,
                sites=settings.public_sites,
                cases_per_site=settings.public_cases,
                test_per_site=0,
                size=settings.size,
                seed=1,
                pooled=True,
            )
        )
    overrides = tuple(f"{settings.overrides} {PRETRAIN_SET}".split())
    # declared public (public_data): the checkpoints record it, and the model's privacy statement says so
    data = state.public / "pooled"
    baseline: BaseProcess | None = None
    log = state.out / "pretrained_mask_only.log"
    baseline_overrides = (*overrides, "model.informed_slice=false")

    def public_stage(stage: Stage, steps: int) -> TrainOptions:
        """One stage of the public pre-training into ``state.pretrained``, tracked."""
        return TrainOptions(
            config=settings.config,
            set=overrides,
            data=data,
            public_data=True,
            stage=stage,
            out=state.pretrained,
            steps=steps,
            track=str(tracking),
        )

    if settings.latent:
        # stage 0 first: the latent stages (the mask-only baseline's too) encode with it
        autoencoder = state.pretrained / "autoencoder.safetensors"
        if not autoencoder.exists():
            run_train(public_stage("autoencoder", settings.autoencoder_steps))
        baseline_overrides = (*baseline_overrides, f"autoencoder.checkpoint={json.dumps(str(autoencoder))}")
    if not (state.mask_only / "volume.safetensors").exists():
        baseline = _start_mask_only_pretraining(state, data, baseline_overrides, log)
    try:
        for stage, steps in zip(PRETRAIN_STAGES, settings.pretrain_steps, strict=True):
            if (state.pretrained / f"{stage}.safetensors").exists():
                continue  # a re-run of the demo keeps what it trained
            run_train(public_stage(stage, steps))
    except BaseException:
        if baseline is not None:
            baseline.kill()
            baseline.join()
        raise
    if baseline is not None:
        baseline.join()
        if baseline.exitcode != 0:
            raise Gem3dError(f"the mask-only baseline's pre-training failed (exit {baseline.exitcode}); see {log}")
    state.summary["pretraining"] = {
        "public_cases": settings.public_sites * settings.public_cases,
        "steps": list(settings.pretrain_steps),
        "mask_only_steps": list(settings.mask_only_steps),
    }
    if settings.latent:
        state.summary["pretraining"]["autoencoder_steps"] = settings.autoencoder_steps


def _copy_shipped(state: DemoState, manifest: dict[str, Any]) -> None:
    """Copy the shipped pre-trained weights of ``manifest`` into the demo folder (kept if there)."""
    settings = state.settings
    assert settings.shipped is not None
    for name in manifest["files"]:
        target = state.out / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(settings.shipped / name, target)
    print(f"public pre-trained weights: shipped ({settings.shipped}, made by {manifest['command']})", flush=True)
    state.summary["pretraining"] = {
        "shipped": True,
        "public_cases": manifest["data"]["cases"],
        "steps": manifest["steps"]["gem3d"],
        "mask_only_steps": manifest["steps"]["mask_only"],
    }


def _start_mask_only_pretraining(state: DemoState, data: Path, overrides: tuple[str, ...], log: Path) -> BaseProcess:
    """Start the mask-only baseline's public pre-training (its stages not yet trained) in a child process.

    Tracked off: two processes writing one SQLite store can lock it, which would switch the main
    run's tracking off; the child's output goes to ``log``.
    """
    settings = state.settings
    stages = tuple(
        TrainOptions(
            config=settings.config,
            set=overrides,
            data=data,
            public_data=True,
            out=state.mask_only,
            track="off",
            stage=stage,
            steps=steps,
        )
        for stage, steps in zip(MASK_ONLY_STAGES, settings.mask_only_steps, strict=True)
        if not (state.mask_only / f"{stage}.safetensors").exists()
    )
    print(f"mask-only baseline: pre-training in a second process (log: {log})", flush=True)
    log.write_text("")  # the child appends: the log exists even if the child dies starting
    # spawn: a fresh interpreter (a fork would copy this process's torch threads and state)
    baseline = multiprocessing.get_context("spawn").Process(
        target=_train_in_child, args=(stages, log), name="gem3d-mask-only-baseline"
    )
    baseline.start()
    return baseline


def _train_in_child(stages: tuple[TrainOptions, ...], log: Path) -> None:
    """``run_train`` for each of ``stages`` in turn, in a child process started with the "spawn" context.

    One intra-op thread, as the demo's main process uses: the child runs beside it on the second
    core. Everything it prints (the stages' lines, progress, a one-line error) goes to ``log``. The
    first failure stops it, with the exit code ``gem3d train`` would have (2 for bad input).
    """
    os.environ["OMP_NUM_THREADS"] = "1"  # for anything that starts threads from the environment
    torch.set_num_threads(1)
    with open(log, "a") as handle:  # the process's stdout and stderr, C-level writes included
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(handle.fileno(), sys.stdout.fileno())
        os.dup2(handle.fileno(), sys.stderr.fileno())

    def train_stages() -> None:
        for options in stages:
            run_train(options)

    sys.exit(report_errors(TRAIN, train_stages))


def site_policy_text(overrides: str, config: str = "tiny") -> str:
    """The privacy policy each demo hospital writes for itself: the demo's DP settings, as a floor.

    In the demo the hospitals and the coordinator agree, so the server's request passes; a
    request for less noise, a larger δ or budget, or no DP, would be refused by every site.
    """
    from experiments.configs import resolve_config_path
    from gem3d.config import load_config
    from server.settings import parse_set

    privacy = load_config(resolve_config_path(config), overrides=parse_set(overrides)).privacy
    return (
        "# This site's own privacy policy: a federated server may only ask for more privacy.\n"
        "[privacy]\n"
        f"enabled = true\nnoise_multiplier = {privacy.noise_multiplier}\ndelta = {privacy.delta}\n"
        f"max_grad_norm = {privacy.max_grad_norm}\nbudget_epsilon = {privacy.budget_epsilon}\n"
    )


def write_site_policies(state: DemoState) -> None:
    """Each hospital's policy in its own state folder (``<site>/.gem3d-site``), if it has none yet."""
    from privacy.site_state import SiteState, default_state_dir

    for site in range(state.settings.sites):
        policy = SiteState(default_state_dir(state.data / f"site_{site}")).policy_path
        if not policy.exists():
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text(site_policy_text(state.settings.overrides, state.settings.config))


def train_federated(state: DemoState, tracking: Path) -> None:
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import create_app

    write_site_policies(state)
    run_config = {
        "config": state.settings.config,
        "data-root": str(state.data),
        "out-dir": str(state.run),
        "init": str(state.pretrained),
        "server-data": str(state.data / "test"),
        "set": state.settings.overrides,
        "tracking-dir": str(tracking),
        "resume": True,
    }
    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
    run_simulation(
        server_app=create_app(run_config),
        client_app=client_app,
        num_supernodes=state.settings.sites,
        backend_config=backend,
    )
    if not (state.run / "volume.safetensors").exists():
        raise Gem3dError(f"{state.run}: the federated run left no volume model; see the Flower log above")
    rounds = [json.loads(line) for line in (state.run / "metrics.jsonl").read_text().splitlines()]
    loss_curve_png(state.out / "pictures" / "loss.png", rounds)
    from privacy.model_privacy import model_statement

    # The model's privacy, as its checkpoints record it: each site's ledger ε (all stages), the
    # maximum over sites, the client-level ε where the server added noise, and what had no DP.
    statement = model_statement(state.run)
    state.summary["privacy"] = statement
    state.summary["epsilon"] = {site: e["epsilon"] for site, e in statement["patient_level"]["sites"].items()}
    state.summary["rounds"] = len(rounds)
    state.summary["final_train_loss"] = rounds[-1].get("train", {}).get("loss") if rounds else None


def release(state: DemoState) -> None:
    if not (state.out / "release" / "privacy_report.json").exists():  # a re-run keeps the release
        run_release(
            ReleaseOptions(
                checkpoint=state.run,
                data=state.data / "site_0",
                # every site audits the candidates against its own patients (a Flower audit round),
                # each with its patients as a leave-one-out reference
                audit_sites=state.data,
                quantile=lowest_quantile(state.settings.cases_per_site),
                per_case=1,
                seed=0,
                out=state.out / "release",
            )
        )
    report = json.loads((state.out / "release" / "privacy_report.json").read_text())
    state.summary["release"] = report


def deenhance(state: DemoState) -> None:
    reference = sorted((state.data / "test" / "imagesTr").glob("*_0000.nii.gz"))[0]
    if not (state.out / "deenhanced" / "deenhance_report.json").exists():  # a re-run keeps it
        out = state.out / "deenhanced"
        run_deenhance(DeenhanceOptions(checkpoint=state.run, data=state.data, reference=str(reference), out=out))
    state.summary["deenhance"] = json.loads((state.out / "deenhanced" / "deenhance_report.json").read_text())


def audit(state: DemoState) -> None:
    # copies found are not an error here (the CLI's exit code 3): the summary reports them
    run_audit(
        AuditOptions(
            synthetic=state.out / "release",
            train=state.data / "site_0",
            holdout=state.data / "test",
            # the test split (held-out patients of every site) is the reference
            quantile=lowest_quantile(state.settings.sites * state.settings.test_per_site),
            checkpoint=state.run,
            out=state.out / "audit" / "audit.json",
            track=str(state.out / "mlflow"),
        )
    )
    state.summary["audit"] = json.loads((state.out / "audit" / "audit.json").read_text())


def evaluate(state: DemoState, tracking: Path) -> None:
    if (state.out / "evaluation" / "report.json").exists():  # a re-run keeps the evaluation
        state.summary["evaluation"] = json.loads((state.out / "evaluation" / "report.json").read_text())
        return
    settings = state.settings
    options = EvaluateOptions(
        checkpoint=state.run,
        data=state.data,
        train_data=state.data / "site_0",
        baseline_checkpoint=(f"mask-only={state.mask_only}",),
        out=state.out / "evaluation" / "report.json",
        quick=settings.quick_evaluation,
        baselines=settings.baselines,
        no_downstream=not settings.downstream,
        threads=1,
        track=str(tracking),
    )
    if settings.downstream:
        options = downstream_question(options, state.data / "site_0")
    run_evaluate(options)
    state.summary["evaluation"] = json.loads((state.out / "evaluation" / "report.json").read_text())


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return "n/a" if value is None else str(value)


def _interval(summary: dict[str, Any]) -> str:
    low, high = summary.get("ci_low"), summary.get("ci_high")
    bounds = f" [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else ""
    return f"{summary['mean']:+.3f}{bounds}"


def downstream_rows(downstream: dict[str, Any]) -> list[tuple[str, str]]:
    """The utility rows: Dice at the few-real point, each arm's paired gain with its 95% interval, the verdict."""
    head = downstream.get("headline")
    if not head:
        return [("downstream segmentation", downstream.get("skipped", "not run"))]
    seeds = len(head["gain"]["per_seed"])
    steps = [r["steps"] for r in downstream["runs"]]
    capped = sum(bool(r["capped"]) for r in downstream["runs"])
    rows = [
        (
            f"Dice, {head['real']} real cases (+ {head['multiplier']} synthetic each), {seeds} seeds: real only / "
            f"+ {head['arm']}",
            f"{head['real_only']['mean']:.3f} / {head['with_synthetic']['mean']:.3f}",
        )
    ]
    for arm, points in downstream["curves"]["multiplier"].items():
        point = next(p for p in points if p["multiplier"] == head["multiplier"])
        rows.append((f"paired Dice gain of {arm} synthetic data (95% CI)", _interval(point["gain"])))
    for arm, difference in (head.get("versus") or {}).items():
        rows.append((f"  {head['arm']} minus {arm}, paired (95% CI)", _interval(difference)))
    rows.append(("  verdict", head["verdict"]))
    rows.append(
        (
            "  segmenters: steps (early stopping), capped",
            f"{min(steps)}-{max(steps)}, {capped} of {len(steps)} capped",
        )
    )
    return rows


Rows = list[tuple[str, str]]  # (what, value) rows of the closing table


def summary_lines(state: DemoState) -> list[str]:
    """The closing table: (what, value) rows, then the time of every step."""
    s = state.summary
    evaluation = s.get("evaluation", {})
    rows = _pretraining_rows(s.get("pretraining") or {}) + _privacy_rows(s) + _deenhance_rows(s.get("deenhance", {}))
    rows += _evaluation_rows(evaluation) + downstream_rows(evaluation.get("downstream") or {})
    width = max((len(name) for name, _ in rows), default=20) + 2
    lines = ["", "gem3d demo: summary", "-" * (width + 20)]
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    lines.append("-" * (width + 20))
    lines += [f"{seconds:7.0f} s  {title}" for title, seconds in state.timings.items()]
    return lines


def _pretraining_rows(pretraining: dict[str, Any]) -> Rows:
    """The public pre-training: cases and steps (and a latent run's autoencoder steps)."""
    if not pretraining:
        return []
    rows = [
        (
            "public pre-training"
            + (" (shipped weights)" if pretraining.get("shipped") else "")
            + ": cases, slice / informed steps (mask-only: slice / volume)",
            f"{pretraining['public_cases']}, {pretraining['steps'][0]} / {pretraining['steps'][1]} "
            f"({pretraining['mask_only_steps'][0]} / {pretraining['mask_only_steps'][1]})",
        )
    ]
    if "autoencoder_steps" in pretraining:
        rows.append(
            (
                "  latent: autoencoder (stage 0) steps, shared by GEM-3D and mask-only",
                str(pretraining["autoencoder_steps"]),
            )
        )
    return rows


def _privacy_rows(s: dict[str, Any]) -> Rows:
    """Each site's ε, the model's privacy statement, the release and its audits."""
    rows: Rows = []
    for site, eps in s.get("epsilon", {}).items():
        rows.append((f"epsilon {site} (patient-level DP-SGD, all stages, delta 1e-5)", _fmt(eps, 2)))
    privacy = s.get("privacy")
    if privacy:
        patient = privacy["patient_level"]
        rows.append(("epsilon of the model (patient-level, max over sites)", _fmt(patient["epsilon"], 2)))
        client = privacy.get("client_level")
        rows.append(("epsilon client-level (server-side DP)", _fmt(client["epsilon"], 2) if client else "not enabled"))
        rows.append(("stages trained on private data without DP", ", ".join(privacy["non_dp_private"]) or "none"))
    release = s.get("release", {})
    if release:
        rows.append(("released synthetic cases", _fmt(release.get("cases", release.get("num_cases")))))
        federated = release.get("federated_audit") or {}
        if federated.get("run"):
            sites = ", ".join(f"{v['site']} {'pass' if v['passed'] else 'FAIL'}" for v in federated["sites"])
            rows.append(("federated audit of the release (each site, its own patients)", sites))
    audit = s.get("audit", {})
    if audit:
        rows.append(
            ("copies found by the audit", f"{audit.get('copies')} of {audit.get('counts', {}).get('synthetic', '?')}")
        )
        mia = audit.get("membership_inference") or {}
        if mia:
            low, high = mia.get("auc_ci95") or (None, None)
            interval = (
                f" (95% CI {_fmt(low, 2)}-{_fmt(high, 2)}, {mia.get('train_cases')} vs {mia.get('holdout_cases')})"
            )
            rows.append(("membership-inference AUC (0.5 = no signal)", _fmt(mia.get("auc")) + interval))
    return rows


def _deenhance_rows(de: dict[str, Any]) -> Rows:
    """The de-enhancement's harmonisation: the spread of label means between sites, before and after."""
    if not de:
        return []
    before, after = de["site_spread_before"]["mean"], de["site_spread_after"]["mean"]
    return [("site spread of label means, before -> after", f"{before:.3f} -> {after:.3f}")]


def _evaluation_rows(evaluation: dict[str, Any]) -> Rows:
    """Each method's fidelity and seams, the informed slice's effect and the background noise."""
    rows: Rows = []
    methods = evaluation.get("methods", {})
    for name, method in methods.items():
        if not isinstance(method, dict) or "skipped" in method:
            continue
        fidelity = method.get("fidelity") or {}
        seam = (method.get("seam_ratio") or {}).get("mean")
        rows.append(
            (
                f"{name}: PSNR whole / foreground (dB), seam ratio",
                f"{_fmt(fidelity.get('psnr'), 2)} / {_fmt(fidelity.get('psnr_foreground'), 2)}, {_fmt(seam)}",
            )
        )
    transfer = evaluation.get("appearance_transfer") or {}
    if transfer.get("without_informed") is not None:
        rows.append(
            (
                "per-label intensity error: with / without the informed slice (ratio)",
                f"{_fmt(transfer['with_informed'])} / {_fmt(transfer['without_informed'])} "
                f"({_fmt(transfer.get('ratio'), 2)})",
            )
        )
    noise = (methods.get("gem3d") or {}).get("background_noise") or {}
    if noise:
        rows.append(
            (
                "gem3d: background std / real (high-frequency part)",
                f"{_fmt(noise.get('std_ratio'), 2)} ({_fmt(noise.get('hf_std_ratio'), 2)})",
            )
        )
    if "full_3d" in methods and evaluation.get("deviations"):
        rows.append(("(full_3d: trained from scratch by evaluate --quick, not a fair comparison)", ""))
    if "mask_only" in methods:
        rows.append(("(mask_only: the same public pre-training as GEM-3D, no informed slice)", ""))
    return rows


DEMO_RECORD = "demo.json"


def check_demo_folder(out: Path, settings: DemoSettings, fresh: bool) -> None:
    """Check ``--out`` before any work: a new or empty folder, or a demo's own to resume or replace.

    A folder that holds something else is refused (``--fresh`` deletes only a demo's folder, and a
    resume must not mix a pixel and a latent run).

    Raises:
        Gem3dError: ``out`` is a file, holds other files, or a demo made with other settings.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise Gem3dError(f"--out {out}: is a file; the demo writes a folder")
    record = out / DEMO_RECORD
    # a demo folder of an earlier version has no record, but its summary or pre-trained stages
    is_demo = record.is_file() or (out / "summary.json").is_file() or (out / "pretrained").is_dir()
    if not is_demo and any(out.iterdir()):
        raise Gem3dError(f"--out {out}: a non-empty folder that is not a demo's; choose another --out")
    if fresh or not record.is_file():
        return
    try:
        made = json.loads(record.read_text())
    except (OSError, ValueError):
        made = None
    if made != settings.recorded():
        config = made.get("config") if isinstance(made, dict) else "unknown"
        raise Gem3dError(
            f"--out {out}: holds a demo made with other settings (config {config}); "
            "resume it with the same options, or pass --fresh, or choose another --out"
        )


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), fresh: bool = False) -> dict[str, Any]:
    """Run every step into ``out``; returns the summary (also written to ``out/summary.json``).

    From a script, call it under ``if __name__ == "__main__":``: the mask-only baseline's child
    process is started with "spawn", which imports the script's main module again (Python's rule
    for ``multiprocessing``; ``gem3d demo`` and ``experiments/pretrained/make.py`` follow it).
    """
    # One intra-op thread: the demo's networks are small, and two threads per process collapse
    # (10-35x slower, measured) whenever the cores are shared, e.g. with the Ray site workers.
    torch.set_num_threads(1)
    check_demo_folder(out, settings, fresh)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_RECORD).write_text(json.dumps(settings.recorded(), indent=2) + "\n")
    state = DemoState(out=out, settings=settings)
    tracking = out / "mlflow"
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"build the {settings.sites}-site demo cohort", lambda: build_cohort(state)),
        (
            "pre-training on public data (not the sites' patients; no DP needed)",
            lambda: pretrain_public(state, tracking),
        ),
        (
            "federated training of all three stages with DP-SGD (Flower simulation)",
            lambda: train_federated(state, tracking),
        ),
        ("privacy release of an enhanced cohort (site_0)", lambda: release(state)),
        ("de-enhancement across the sites", lambda: deenhance(state)),
        ("memorization audit and membership inference", lambda: audit(state)),
        ("evaluation against baselines", lambda: evaluate(state, tracking)),
    ]
    with Tracker(tracking, "gem3d-demo", "demo", tags={"gem3d.kind": "demo"}) as tracker:
        for index, (title, work) in enumerate(steps, start=1):
            _step(state, index, len(steps), title, work)
        numbers = {f"epsilon.{k}": v for k, v in state.summary.get("epsilon", {}).items()}
        numbers.update({f"seconds.{i}": t for i, t in enumerate(state.timings.values(), start=1)})
        tracker.log_metrics(numbers)
        for report in ("release/privacy_report.json", "deenhanced/deenhance_report.json", "audit/audit.json"):
            if (out / report).exists():
                tracker.log_artifact(out / report, artifact_path=Path(report).parent.name)
        for png in out.glob("**/*.png"):
            if "mlflow" not in png.parts:
                tracker.log_artifact(png, artifact_path="pictures")
    (out / "summary.json").write_text(
        json.dumps({"summary": state.summary, "timings": state.timings}, indent=2, default=str)
    )
    print("\n".join(summary_lines(state)))
    print(f"\noutputs: {out}\nbrowse the runs: {ui_command(tracking)}")
    return state.summary
