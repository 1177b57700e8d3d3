"""Privacy that holds against the coordinator: secret sampling, site-owned policy, a binding ledger, private figures.

Each test plays an adversary: the server regenerating a site's Poisson batches from the seed it
sent, a server asking a site for less privacy than its policy, two trainings racing for one
ledger, a new run folder hoping for a fresh budget, a checkpoint's fingerprint used to confirm a
guess of the data. The ε figures are checked against Google's dp-accounting, not against the
Opacus accountant the ledger itself uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.simulation import run_simulation
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from client.app import app as client_app
from client.task import RoundJob, Site, train_round
from gem3d.checkpoint import read_metadata
from gem3d.config import Config, PrivacyConfig, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import fingerprint
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model, state_tensors
from gem3d.training import freeze_for_stage, new_state, travelling_names
from privacy.dp_sgd import train_private
from privacy.errors import PolicyRefusedError, PrivacyBudgetError
from privacy.ledger import PrivacyLedger
from privacy.model_privacy import model_statement
from privacy.policy import enforce_policy
from privacy.site_state import SiteState
from server.app import create_app
from tests.conftest import copy_dataset

REPO = Path(__file__).resolve().parent.parent
MICRO_ARGS = [
    "--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'",
    "--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4",
    "--set", "model.num_head_channels=8", "--set", "train.batch_size=2", "--track", "off",
]  # fmt: skip
DP_ARGS = ["--set", "privacy.enabled=true", "--set", "privacy.budget_epsilon=100"]


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of Poisson-subsampled Gaussian steps from dp-accounting's RDP accountant (not Opacus's)."""
    accountant = RdpAccountant()
    for sigma, rate, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def dp_config(cfg: Config, **privacy: Any) -> Config:
    settings = {"enabled": True, "budget_epsilon": 100.0, **privacy}
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update=settings)})


def write_policy(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "privacy_policy.toml").write_text(f"[privacy]\n{text}\n")


def test_two_dp_trainings_with_one_seed_draw_secret_batches(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare: everything the coordinator knows (seed, config, number of patients) is the same
    cfg = dp_config(micro_cfg)
    volumes = load_volumes(phantom_dir, cfg.data)
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    steps = 12
    runs = []
    for index in range(2):
        model = build_model("slice", cfg)
        freeze_for_stage(model, "slice", False)
        state = new_state(model, cfg.train)
        seen: list[dict[str, float]] = []
        ledger = PrivacyLedger.open(tmp_path / f"ledger{index}.json", cfg.privacy)
        # execute
        train_private(state, noise_process(cfg.diffusion), source, "slice", steps, cfg.train, seen.append,
                      privacy_cfg=cfg.privacy, ledger=ledger)  # fmt: skip
        runs.append((seen, state))
    # the coordinator's attack: regenerate the Poisson sample from train.seed and the site's size
    replay = torch.Generator().manual_seed(cfg.train.seed)
    sampler = UniformWithReplacementSampler(num_samples=len(volumes), sample_rate=0.5, generator=replay, steps=steps)
    predicted = [float(len(indices)) for indices in sampler]
    # assert: different first batches; the replayed batch sizes match neither run
    (first, state_a), (second, state_b) = runs
    assert first[0]["loss"] != second[0]["loss"]
    for seen in (first, second):
        assert [m["batch_size"] for m in seen] != predicted
    # assert: a checkpoint of either run holds no random state at all, so nothing of the Poisson sample
    for state in (state_a, state_b):
        tensors, fields = state_tensors(state)
        assert not [name for name in tensors if "rng" in name or "generator" in name]
        assert fields["step"] == steps and state.seed == cfg.train.seed


@pytest.mark.parametrize(
    ("request_fields", "refusal"),
    [
        ({"enabled": False}, "refuses training without DP-SGD"),
        ({"noise_multiplier": 0.5}, "noise multiplier 0.5 < the policy's least 1"),
        ({"delta": 1e-3}, "privacy.delta=0.001 > the policy's 1e-05"),
        ({"budget_epsilon": 50.0}, "privacy.budget_epsilon=50 > the policy's 8"),
        ({"max_grad_norm": 5.0}, "privacy.max_grad_norm=5 > the policy's 1"),
        ({"noise_multiplier": None, "target_epsilon": 100.0}, "< the policy's least 1"),
    ],
)
def test_a_request_weaker_than_the_site_policy_is_refused(request_fields: dict[str, Any], refusal: str) -> None:
    policy = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0, budget_epsilon=8.0)
    request = PrivacyConfig(enabled=True, noise_multiplier=1.0, budget_epsilon=8.0).model_copy(update=request_fields)

    with pytest.raises(PolicyRefusedError, match="site_x: refuses") as refused:
        enforce_policy(policy, request, batch_size=2, num_cases=20, planned_steps=100, site="site_x")

    assert refusal in str(refused.value)


def test_stricter_requests_are_run_and_a_site_without_policy_refuses_dp() -> None:
    policy = PrivacyConfig(enabled=True, noise_multiplier=1.0, budget_epsilon=8.0)
    stricter = PrivacyConfig(enabled=True, noise_multiplier=2.0, delta=1e-6, max_grad_norm=0.5, budget_epsilon=4.0)
    cases = {"batch_size": 2, "num_cases": 20, "planned_steps": 100, "site": "s"}

    assert enforce_policy(policy, stricter, **cases) == stricter  # type: ignore[arg-type]
    assert enforce_policy(None, PrivacyConfig(enabled=False), **cases).enabled is False  # type: ignore[arg-type]
    with pytest.raises(PolicyRefusedError, match="this site has no privacy policy"):
        enforce_policy(None, stricter, **cases)  # type: ignore[arg-type]


def _site_with(phantom_dir: Path, tmp_path: Path) -> Site:
    data = copy_dataset(phantom_dir, tmp_path / "site_0")
    return Site(name="site_0", data_dir=data, state_dir=tmp_path / "state", index=0)


def _job(cfg: Config) -> RoundJob:
    record = {"stage": "slice", "gem3d-config": json.dumps(cfg.model_dump(mode="json")), "local-steps": 2, "seed": 0}
    return RoundJob.from_record(record)


def _weights(cfg: Config) -> dict[str, torch.Tensor]:
    model = build_model("slice", cfg)
    freeze_for_stage(model, "slice", train_all=False)
    return {name: model.state_dict()[name] for name in travelling_names(model)}


def test_a_dp_site_sends_only_noised_weights_and_accounted_figures(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare
    site = _site_with(phantom_dir, tmp_path)
    write_policy(site.state_dir, "enabled = true\nnoise_multiplier = 1.0\nbudget_epsilon = 50")
    cfg = dp_config(micro_cfg, budget_epsilon=50.0)
    # execute
    _, reply = train_round(site, _job(cfg), _weights(cfg))
    # assert: no loss, no exact case count (4), no timing that grows with the Poisson sample
    assert set(reply) == {"steps", "site-index", "pack-seconds", "num-examples", "dp", "epsilon", "delta",
                          "telemetry-withheld"}  # fmt: skip
    assert reply["num-examples"] == 1.0 and reply["dp"] == 1.0
    ledger = PrivacyLedger.read(site.state_dir / "privacy_ledger.json")
    assert reply["epsilon"] == pytest.approx(ledger.epsilon) and ledger.budget_epsilon == 50.0


def test_a_site_refuses_the_server_and_trains_nothing(micro_cfg: Config, phantom_dir: Path, tmp_path: Path) -> None:
    # prepare: the site requires σ >= 1.5; the server asks for σ = 0.5, then for no DP at all
    site = _site_with(phantom_dir, tmp_path)
    write_policy(site.state_dir, "enabled = true\nnoise_multiplier = 1.5")
    for request in (dp_config(micro_cfg, noise_multiplier=0.5), micro_cfg):
        # execute / assert
        with pytest.raises(PolicyRefusedError, match="site_0: refuses"):
            train_round(site, _job(request), _weights(request))
    assert not (site.state_dir / "privacy_ledger.json").exists()


def test_ledger_terms_are_fixed_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.json"
    PrivacyLedger.open(path, PrivacyConfig(enabled=True, budget_epsilon=5.0, delta=1e-5)).record(10, 1.0, 0.5)

    with pytest.raises(PrivacyBudgetError, match="fixed at 5 when its ledger was created"):
        PrivacyLedger.open(path, PrivacyConfig(enabled=True, budget_epsilon=50.0))
    with pytest.raises(PrivacyBudgetError, match=r"privacy\.delta=0\.001 is larger"):
        PrivacyLedger.open(path, PrivacyConfig(enabled=True, budget_epsilon=5.0, delta=1e-3))
    stricter = PrivacyLedger.open(path, PrivacyConfig(enabled=True, budget_epsilon=1.0))
    assert stricter.budget_epsilon == 5.0 and stricter.steps == 10
    with pytest.raises(PrivacyBudgetError, match=r"over the budget privacy\.budget_epsilon=1"):
        stricter.check(1000, 1.0, 0.5)


def _gem3d_train(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "experiments.cli", "train", *MICRO_ARGS, *argv]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_concurrent_runs_and_init_continuations_spend_one_ledger(phantom_dir: Path, tmp_path: Path) -> None:
    # prepare: one site (data + state); two trainings race, then a third fine-tunes the first's run
    state = tmp_path / "site"
    common = [*DP_ARGS, "--data", str(phantom_dir), "--site-state", str(state), "--stage", "slice"]
    # execute
    racing = [_gem3d_train(*common, "--out", str(tmp_path / name), "--steps", "6") for name in ("a", "b")]
    results = [process.communicate(timeout=300) for process in racing]
    assert all(process.returncode == 0 for process in racing), results
    init = _gem3d_train(*common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a"), "--steps", "4")
    _, err = init.communicate(timeout=300)
    assert init.returncode == 0, err
    # assert: every step of the three runs is in the site's ledger, and ε matches dp-accounting
    ledger = PrivacyLedger.read(state / "privacy_ledger.json")
    assert ledger.steps == 6 + 6 + 4
    assert {spend["status"] for spend in json.loads(ledger.path.read_text())["spends"]} == {"spent"}
    assert ledger.epsilon == pytest.approx(independent_epsilon(ledger.history, ledger.delta), rel=0.03)
    assert not any((tmp_path / name / "privacy_ledger.json").exists() for name in "abc")
    # assert: the fine-tuned run's statement carries the ledger's ε at its end
    statement = model_statement(tmp_path / "c")
    assert statement["non_dp_private"] == []
    assert statement["patient_level"]["epsilon"] == pytest.approx(ledger.epsilon)


def test_checkpoints_record_what_each_stage_was_trained_on(phantom_dir: Path, tmp_path: Path) -> None:
    from experiments.cli import main

    # prepare / execute: public pre-training, a DP fine-tune from it, and a non-DP run on private data
    site = ["--site-state", str(tmp_path / "site")]
    data = ["--data", str(phantom_dir), "--stage", "slice", "--steps", "2"]
    assert main(["train", *MICRO_ARGS, *data, "--public-data", "--out", str(tmp_path / "public")]) == 0
    tuned = [*data, *site, *DP_ARGS, "--init", str(tmp_path / "public"), "--out", str(tmp_path / "tuned")]
    assert main(["train", *MICRO_ARGS, *tuned]) == 0
    assert main(["train", *MICRO_ARGS, *data, *site, "--out", str(tmp_path / "plain")]) == 0
    # assert
    tuned_statement = model_statement(tmp_path / "tuned")
    assert tuned_statement["non_dp_private"] == [] and tuned_statement["public"] == ["slice <- init " + _sha(tmp_path)]
    assert tuned_statement["patient_level"]["epsilon"] > 0
    plain = model_statement(tmp_path / "plain")
    assert plain["patient_level"]["epsilon"] is None
    assert len(plain["non_dp_private"]) == 1 and "without DP-SGD" in plain["non_dp_private"][0]
    assert model_statement(tmp_path / "public")["public"] == ["slice"]


def _sha(tmp_path: Path) -> str:
    from gem3d.checkpoint import file_sha256

    return file_sha256(tmp_path / "public" / "slice.safetensors")[:12]


def test_a_checkpoint_fingerprint_cannot_confirm_a_guess_of_the_data(phantom_dir: Path, tmp_path: Path) -> None:
    from experiments.cli import main

    # prepare
    site = SiteState(tmp_path / "site")
    argv = [*MICRO_ARGS, "--data", str(phantom_dir), "--site-state", str(site.folder), "--stage", "slice"]
    assert main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    metadata = read_metadata(tmp_path / "run" / "slice.safetensors")
    stored = metadata["data_fingerprint"]
    # execute: an adversary who has (or guesses) the exact data, but not the site's key
    volumes = load_volumes(phantom_dir, config_from_dict(metadata["config"]).data)
    # assert: neither the plain hash nor an HMAC under another key matches; the site's key does
    assert stored != fingerprint(volumes) and stored != fingerprint(volumes, os.urandom(32))
    assert stored == site.fingerprint(volumes)
    assert oct((site.folder / "site.key").stat().st_mode)[-3:] == "600"


@pytest.fixture(scope="module")
def refusing_federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A simulation where the server asks for σ = 0.8; site_0's policy demands 2.0, site_1's 0.5."""
    root = tmp_path_factory.mktemp("sites")
    for index in range(2):
        write_phantom_dataset(root / f"site_{index}", num_cases=3, shape=(16, 16, 12), seed=index)
    states = tmp_path_factory.mktemp("states")
    write_policy(states / "site_0", "enabled = true\nnoise_multiplier = 2.0\nbudget_epsilon = 100")
    write_policy(states / "site_1", "enabled = true\nnoise_multiplier = 0.5\nbudget_epsilon = 100")
    out = tmp_path_factory.mktemp("federated") / "run"
    micro = (
        "data.image_size=16 data.window=4 model.channels=8,16 model.attention_levels=false,true "
        "model.norm_num_groups=4 model.num_head_channels=8 train.batch_size=2 federation.local_steps=2 "
        "federation.rounds_slice=1 federation.rounds_volume=0 federation.rounds_informed=0 "
        "privacy.enabled=true privacy.noise_multiplier=0.8 privacy.budget_epsilon=100"
    )
    run_config = {"data-root": str(root), "state-root": str(states), "out-dir": str(out), "set": micro,
                  "val-cases": 0, "tracking-dir": "off"}  # fmt: skip
    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
    run_simulation(server_app=create_app(run_config), client_app=client_app, num_supernodes=2, backend_config=backend)
    return {"out": out, "states": states}


def test_a_federated_site_refuses_less_privacy_and_the_run_goes_on(refusing_federation: dict[str, Any]) -> None:
    out, states = refusing_federation["out"], refusing_federation["states"]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # assert: site_0 refused with its reason (logged by the server), site_1 trained, the run went on
    assert len(rounds) == 1 and rounds[0]["sites-ok"] == 1 and rounds[0]["sites-failed"] == 1
    assert "site_0: refuses a request weaker than its privacy policy" in rounds[0]["failures"][0]
    assert not (states / "site_0" / "privacy_ledger.json").exists()
    ledger = PrivacyLedger.read(states / "site_1" / "privacy_ledger.json")
    assert ledger.steps == 2
    # assert: the global checkpoint states the model's privacy: site_1's ledger ε, nothing without DP
    statement = model_statement(out)
    assert statement["non_dp_private"] == [] and set(statement["patient_level"]["sites"]) == {"site_1"}
    assert statement["patient_level"]["epsilon"] == pytest.approx(ledger.epsilon)
    # assert: what the server logged of the DP site: withheld telemetry, uniform weight, its ε
    (reply,) = rounds[0]["per-site"].values()
    assert reply["telemetry-withheld"] == 1.0 and reply["num-examples"] == 1.0
    assert rounds[0]["train"]["epsilon"] == reply["epsilon"]  # the maximum over sites, not FedAvg's mean
    assert "loss" not in reply and "train-seconds" not in reply
    assert (out / "slice.safetensors").exists()
