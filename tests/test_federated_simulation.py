"""Federated training in Flower's simulation: all stages, local equivalence, a killed server, a broken site.

One scenario, run once for the module (Ray start-up dominates the cost):

1. One site, one FedAvg round of stage 1, in a separate process that is SIGKILLed from the
   server's ``on_round`` hook right after that round's checkpoint: a server killed mid-run.
2. The run resumed in this process with three SuperNodes: the same site, a second one, and a
   third whose data folder is broken. It must do stage 1's second round, then stage 2 and the
   informed generator.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.simulation import run_simulation

from client.app import app as client_app
from gem3d.checkpoint import load_checkpoint, subset
from gem3d.config import load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.runs import build_model, load_model, train_stage
from gem3d.training import freeze_for_stage
from server.app import create_app
from server.settings import ServerSettings, parse_set

REPO = Path(__file__).resolve().parent.parent
# The micro network of tests/conftest.py as a run-config "set" string (Flower passes only scalars).
MICRO_SET = (
    "data.image_size=16 data.window=4 "
    "model.channels=8,16 model.attention_levels=false,true model.norm_num_groups=4 model.num_head_channels=8 "
    "informed.channels=8,16 informed.attention_levels=false,true informed.norm_num_groups=4 "
    "informed.num_head_channels=8 informed.position_bins=8 train.batch_size=2 "
    "federation.local_steps=2 federation.rounds_slice=2 federation.rounds_volume=1 federation.rounds_informed=1"
)
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}

# The first run: kill the whole simulation (server, Ray workers) after the first completed round.
_KILLED_RUN = """
import json, os, signal, sys
from flwr.simulation import run_simulation
from client.app import app
from server.app import create_app

def kill_after_first_round(metrics):
    os.killpg(os.getpgid(0), signal.SIGKILL)

run_config = json.loads(sys.argv[1])
server = create_app(run_config, on_round=kill_after_first_round)
run_simulation(server_app=server, client_app=app, num_supernodes=1, backend_config=json.loads(sys.argv[2]))
"""


def read_rounds(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # prepare: two phantom sites and a third with an empty dataset; every case trains (val-cases 0)
    root = tmp_path_factory.mktemp("sites")
    for index in range(2):
        write_phantom_dataset(root / f"site_{index}", num_cases=3, shape=(16, 16, 12), seed=index)
    (root / "site_2" / "labelsTr").mkdir(parents=True)
    out = tmp_path_factory.mktemp("federated") / "run"
    run_config = {"data-root": str(root), "out-dir": str(out), "set": MICRO_SET, "val-cases": 0}
    # execute 1: a new session, so the kill takes the Ray workers with it
    first = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(run_config), json.dumps(BACKEND)],
        cwd=REPO,
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=300,
    )
    if not (out / "server_state.json").exists():
        pytest.fail(f"the first run checkpointed no round (exit {first.returncode}):\n{first.stderr[-3000:]}")
    killed_state = json.loads((out / "server_state.json").read_text())
    shutil.copy(out / "slice.safetensors", out.parent / "slice_after_kill.safetensors")
    # execute 2: resume, now with three SuperNodes and at least two answers required per round
    resumed = {**run_config, "set": MICRO_SET + " federation.min_clients=2"}
    run_simulation(server_app=create_app(resumed), client_app=client_app, num_supernodes=3, backend_config=BACKEND)
    return {
        "root": root,
        "out": out,
        "first_returncode": first.returncode,
        "killed_state": killed_state,
        "slice_after_kill": out.parent / "slice_after_kill.safetensors",
    }


def test_one_site_one_round_of_fedavg_equals_local_training(scenario: dict[str, Any], tmp_path: Path) -> None:
    # prepare
    cfg = load_config(REPO / "experiments" / "configs" / "tiny.toml", parse_set(MICRO_SET))
    site = scenario["root"] / "site_0"
    # execute: `gem3d train` of the same steps from the same seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the site trained with one thread: same float reduction order
    try:
        train_stage(cfg, load_volumes(site, cfg.data), "slice", tmp_path / "local", steps=cfg.federation.local_steps)
    finally:
        torch.set_num_threads(threads)
    # assert
    federated = subset(load_checkpoint(scenario["slice_after_kill"])[0], "model")
    local = subset(load_checkpoint(tmp_path / "local" / "slice.safetensors")[0], "model")
    initial = build_model("slice", cfg).state_dict()
    assert federated.keys() == local.keys()
    for name, value in local.items():
        torch.testing.assert_close(federated[name], value, rtol=1e-5, atol=1e-6)
    assert any(not initial[name].equal(value) for name, value in local.items())


def test_a_killed_server_resumes_after_its_last_completed_round(scenario: dict[str, Any]) -> None:
    # assert: the first run died by SIGKILL after slice round 1; the second did exactly what was left
    assert scenario["first_returncode"] == -signal.SIGKILL
    assert scenario["killed_state"]["completed"] == {"autoencoder": 0, "slice": 1, "volume": 0, "informed": 0}
    rounds = [(r["stage"], r["round"]) for r in read_rounds(scenario["out"])]
    assert rounds == [("slice", 1), ("slice", 2), ("volume", 1), ("informed", 1)]
    progress = json.loads((scenario["out"] / "server_state.json").read_text())
    assert progress["completed"] == {"autoencoder": 0, "slice": 2, "volume": 1, "informed": 1}


def test_all_three_stages_leave_a_loadable_run_folder(scenario: dict[str, Any]) -> None:
    # assert: the run folder of `gem3d train`; after one round a stage's EMA is its global weights
    for stage, rounds in (("slice", 2), ("volume", 1), ("informed", 1)):
        _, _, metadata = load_model(scenario["out"] / f"{stage}.safetensors")
        assert metadata["stage"] == stage and metadata["rounds"] == rounds and metadata["federated"]
        if rounds == 1:
            tensors, _ = load_checkpoint(scenario["out"] / f"{stage}.safetensors")
            for name, value in subset(tensors, "model").items():
                assert value.equal(tensors[f"ema.{name}"])
    assert (scenario["out"] / "config.json").exists()


def test_the_server_keeps_an_ema_across_a_kill_and_samplers_load_it(scenario: dict[str, Any]) -> None:
    # prepare: round 1's global weights (saved before the kill) and round 2's, with the EMA after it
    cfg = load_config(REPO / "experiments" / "configs" / "tiny.toml", parse_set(MICRO_SET))
    first = subset(load_checkpoint(scenario["slice_after_kill"])[0], "model")
    tensors, _ = load_checkpoint(scenario["out"] / "slice.safetensors")
    second, ema = subset(tensors, "model"), subset(tensors, "ema")
    # execute: what `gem3d sample` loads, and the base stage 2 inflated
    sampled = load_model(scenario["out"] / "slice.safetensors")[0].state_dict()
    volume = subset(load_checkpoint(scenario["out"] / "volume.safetensors")[0], "model")
    inflated = build_model("slice", cfg)
    inflated.load_state_dict(ema)
    inflated.inflate()
    base = {name for name, _ in inflated.named_parameters()} - _slice_axis_names(inflated)
    # assert: update 2 (after one) uses the warm-up decay min(d, 2/11); round 1 replaced the initial copy
    decay = min(cfg.train.ema_decay**cfg.federation.local_steps, 2 / 11)
    assert int(tensors["ema_n_averaged"]) == 2
    moved = 0
    for name, value in second.items():
        torch.testing.assert_close(ema[name], decay * first[name] + (1 - decay) * value, rtol=1e-5, atol=1e-7)
        moved += not torch.equal(ema[name], value)
        assert torch.equal(sampled[name], ema[name])
    assert moved > len(second) // 2
    for name, value in inflated.state_dict().items():  # the frozen stage-2 base is the slice EMA
        if name in base:
            assert torch.equal(volume[name], value), name


def _slice_axis_names(model: torch.nn.Module) -> set[str]:
    axis = {id(p) for p in model.slice_axis_parameters()}  # type: ignore[operator]
    return {name for name, p in model.named_parameters() if id(p) in axis}


def test_a_site_with_broken_data_is_logged_and_left_out(scenario: dict[str, Any]) -> None:
    # assert: after the resume, each round aggregated the two good sites and recorded the third's error
    for record in read_rounds(scenario["out"])[1:]:
        assert record["sites-ok"] == 2 and record["sites-failed"] == 1
        assert "site_2" in record["failures"][0]  # the reason names the broken folder
        assert record["train"]["steps"] == 2.0 and record["evaluate"]["eval-loss"] > 0


def test_stage_two_messages_carry_only_the_slice_axis_weights(scenario: dict[str, Any]) -> None:
    # prepare: the trainable parameters of the frozen stage-2 network
    cfg = load_config(None, parse_set(MICRO_SET))
    model = build_model("volume", cfg)
    freeze_for_stage(model, "volume", train_all=False)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    # execute
    rounds = {r["stage"]: r for r in read_rounds(scenario["out"])}
    # assert
    assert rounds["volume"]["sent-keys"] == trainable
    assert all(".slice_conv." in name or ".slice_attn." in name for name in trainable)
    assert rounds["volume"]["sent-arrays"] < len(model.state_dict())
    assert rounds["slice"]["sent-arrays"] == len(build_model("slice", cfg).state_dict())


def test_run_config_maps_onto_the_gem3d_config(tmp_path: Path) -> None:
    # execute: Flower's flat run config, with `set` and a dotted key
    run_config = {
        "config": "tiny",
        "out-dir": str(tmp_path / "run"),
        "set": "model.channels=8,16 model.attention_levels=false,true train.lr=0.01",
        "federation.strategy": "krum",
    }
    settings = ServerSettings.from_run_config(run_config)
    # assert
    assert settings.cfg.model.channels == (8, 16) and settings.cfg.train.lr == 0.01
    assert settings.cfg.federation.strategy == "krum"
    assert settings.out_dir.is_absolute()
