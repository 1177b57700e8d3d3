"""One site's work in a round, without Flower: locating data, DP-SGD with a persistent ledger, FedProx, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from client.task import Job, Site, evaluate_round, locate_site, train_round, travelling_names
from gem3d.config import Config
from gem3d.errors import ConfigError, DataError
from gem3d.runs import build_model
from gem3d.training import freeze_for_stage


def make_job(cfg: Config, **record: object) -> Job:
    base = {"stage": "slice", "gem3d-config": json.dumps(cfg.model_dump(mode="json")), "local-steps": 2, "seed": 0}
    return Job.from_record({**base, **record})


def global_weights(cfg: Config) -> dict[str, torch.Tensor]:
    model = build_model("slice", cfg)
    freeze_for_stage(model, "slice", train_all=False)
    return {name: model.state_dict()[name] for name in travelling_names(model)}


@pytest.fixture
def site(phantom_dir: Path, tmp_path: Path) -> Site:
    data = shutil.copytree(phantom_dir, tmp_path / "site_0")
    return Site(name="site_0", data_dir=data, state_dir=tmp_path / "state", index=0)


def test_a_site_is_found_from_node_config_or_its_partition(tmp_path: Path) -> None:
    # execute
    deployed = locate_site({"data-dir": str(tmp_path / "h1"), "site-index": 2}, {"state-root": "/elsewhere"})
    simulated = locate_site({"partition-id": 1}, {"data-root": str(tmp_path), "state-root": str(tmp_path / "st")})
    # assert: a deployed site keeps its state next to its data, never where the server says
    assert deployed.data_dir == tmp_path / "h1" and deployed.state_dir == tmp_path / "h1" / ".gem3d-site"
    assert deployed.index == 2
    assert simulated.data_dir == tmp_path / "site_1" and simulated.state_dir == tmp_path / "st" / "site_1"
    with pytest.raises(ConfigError, match="data-dir"):
        locate_site({}, {})


def test_dp_round_reports_epsilon_and_persists_the_ledger(micro_cfg: Config, site: Site) -> None:
    # prepare
    cfg = micro_cfg.model_copy(update={"privacy": micro_cfg.privacy.model_copy(update={"enabled": True})})
    job = make_job(cfg)
    # execute: two rounds at the same site
    _, first = train_round(site, job, global_weights(cfg))
    weights, second = train_round(site, job, global_weights(cfg))
    # assert: epsilon accumulates across rounds in the site's ledger; only plain names leave the site
    assert 0 < first["epsilon"] < second["epsilon"] and second["delta"] == cfg.privacy.delta
    assert (site.state_dir / "privacy_ledger.json").exists()
    assert not any("_module." in name for name in weights)


def test_fedprox_pulls_the_local_model_toward_the_global_one(micro_cfg: Config, site: Site) -> None:
    # prepare
    start = global_weights(micro_cfg)
    # execute
    plain, _ = train_round(site, make_job(micro_cfg), start)
    proximal, _ = train_round(site, make_job(micro_cfg, **{"proximal-mu": 1e4}), start)
    # assert
    distance = lambda w: sum(float((w[n] - start[n]).norm()) for n in start)  # noqa: E731
    assert distance(proximal) < distance(plain)


def test_evaluation_holds_out_cases_and_broken_data_fails_clearly(micro_cfg: Config, site: Site) -> None:
    # execute
    metrics = evaluate_round(site, make_job(micro_cfg, **{"val-cases": 1}), global_weights(micro_cfg))
    missing = Site(name="site_9", data_dir=site.data_dir.parent / "nope", state_dir=site.state_dir, index=9)
    # assert
    assert metrics["held-out"] == 1.0 and metrics["num-examples"] == 1.0 and metrics["eval-loss"] > 0
    with pytest.raises(DataError, match="site_9"):
        train_round(missing, make_job(micro_cfg), global_weights(micro_cfg))
