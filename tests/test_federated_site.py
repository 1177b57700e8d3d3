"""One site's work in a round, without Flower: locating data, DP-SGD with a persistent ledger, FedProx, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from client.task import (
    RoundJob,
    Site,
    clear_caches,
    evaluate_round,
    install_base,
    locate_site,
    site_volumes,
    train_round,
    travelling_names,
)
from gem3d.config import Config
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.errors import ConfigError, DataError
from gem3d.runs import build_model
from gem3d.training import freeze_for_stage
from tests.conftest import copy_dataset


def make_job(cfg: Config, **record: object) -> RoundJob:
    base = {"stage": "slice", "gem3d-config": json.dumps(cfg.model_dump(mode="json")), "local-steps": 2, "seed": 0}
    return RoundJob.from_record({**base, **record})


def global_weights(cfg: Config) -> dict[str, torch.Tensor]:
    model = build_model("slice", cfg)
    freeze_for_stage(model, "slice", train_all=False)
    return {name: model.state_dict()[name] for name in travelling_names(model)}


@pytest.fixture
def site(phantom_dir: Path, tmp_path: Path) -> Site:
    data = copy_dataset(phantom_dir, tmp_path / "site_0")
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
    site.state_dir.mkdir(parents=True)
    (site.state_dir / "privacy_policy.toml").write_text("[privacy]\nenabled = true\nnoise_multiplier = 1.0\n")
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


@pytest.mark.parametrize("stage", ["slice", "volume"])
def test_a_reused_network_and_data_give_the_weights_of_a_fresh_process(
    micro_cfg: Config, site: Site, stage: str
) -> None:
    # prepare: global weights of the stage; stage 2 trains on an installed base, made nonzero
    # (MONAI zero-initialises the output conv, which leaves the slice-axis layers without gradient)
    model = build_model("slice", micro_cfg)
    generator = torch.Generator().manual_seed(0)
    base = {
        name: value + 0.1 * torch.randn(value.shape, generator=generator) for name, value in model.state_dict().items()
    }
    model.load_state_dict(base)
    if stage == "volume":
        install_base(site, "b1", base)
        model.inflate()
    freeze_for_stage(model, stage, train_all=False)
    start = {name: model.state_dict()[name].clone() for name in travelling_names(model)}
    job = make_job(micro_cfg, stage=stage, **{"base-id": "b1"})
    clear_caches()
    # execute: a fresh round, the same round on the cached network and data, then another seed
    fresh, fresh_metrics = train_round(site, job, start)
    kept = {name: value.clone() for name, value in fresh.items()}
    reused, metrics = train_round(site, job, start)
    other, _ = train_round(site, make_job(micro_cfg, stage=stage, seed=1, **{"base-id": "b1"}), start)
    # assert: bitwise equal, and a reply is a copy that later rounds do not change
    assert fresh.keys() == set(start)
    assert all(torch.equal(reused[name], kept[name]) and torch.equal(fresh[name], kept[name]) for name in start)
    assert any(not torch.equal(fresh[name], start[name]) for name in start)
    assert any(not torch.equal(other[name], kept[name]) for name in start)
    assert metrics["train-seconds"] > 0 and metrics["setup-seconds"] >= 0 and metrics["pack-seconds"] >= 0
    assert fresh_metrics["loss"] == metrics["loss"]


def test_site_data_is_loaded_once_and_reloaded_when_its_files_change(micro_cfg: Config, site: Site) -> None:
    # prepare
    clear_caches()
    first = site_volumes(site, micro_cfg)
    # execute: the site's own state (a hidden folder) changes, then a case is added
    (site.data_dir / ".gem3d-site").mkdir()
    (site.data_dir / ".gem3d-site" / "privacy_ledger.json").write_text("{}")
    same = site_volumes(site, micro_cfg)
    more = write_phantom_dataset(site.data_dir.parent / "more", num_cases=5, shape=(16, 16, 12))
    for part in ("imagesTr/phantom_004_0000.nii.gz", "labelsTr/phantom_004.nii.gz", "dataset.json"):
        shutil.copy(more / part, site.data_dir / part)
    changed = site_volumes(site, micro_cfg)
    # assert
    assert same is first
    assert len(first) == 4 and len(changed) == 5
