"""Latent GEM-3D in Flower's simulation: the autoencoder is a federated stage, then installed at every site.

Two phantom sites, one round of each stage (autoencoder, slice, volume, informed). The sites
install the global autoencoder as the latent stages' frozen base, so those rounds carry only the
weights that train; every stage checkpoint holds the global autoencoder's weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.simulation import run_simulation

from client.app import app as client_app
from gem3d.checkpoint import load_checkpoint, read_metadata, subset
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.diffusion import make_sampler
from gem3d.networks import SliceDenoiser
from gem3d.runs import load_model
from gem3d.sampler import InformedSlice, SampleRequest, sample_volumes
from server.app import create_app
from tests.test_federated_simulation import BACKEND, MICRO_SET

LATENT_SET = (
    MICRO_SET.replace("federation.rounds_slice=2", "federation.rounds_slice=1")
    + " model.latent=true autoencoder.channels=8,8 autoencoder.latent_channels=2 autoencoder.norm_num_groups=4"
    + " federation.rounds_autoencoder=1"
)


@pytest.fixture(scope="module")
def latent_federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("latent_sites")
    for index in range(2):
        write_phantom_dataset(root / f"site_{index}", num_cases=3, shape=(16, 16, 12), seed=index)
    out = tmp_path_factory.mktemp("latent_federated") / "run"
    run_config = {"data-root": str(root), "out-dir": str(out), "set": LATENT_SET, "val-cases": 0}
    run_simulation(server_app=create_app(run_config), client_app=client_app, num_supernodes=2, backend_config=BACKEND)
    return {"root": root, "out": out}


def test_every_stage_of_a_latent_model_trains_federatedly(latent_federation: dict[str, Any]) -> None:
    out = latent_federation["out"]
    for stage in ("autoencoder", "slice", "volume", "informed"):
        metadata = read_metadata(out / f"{stage}.safetensors")
        assert metadata["stage"] == stage and metadata["rounds"] == 1 and metadata["federated"]


def test_the_latent_stages_hold_the_global_autoencoder(latent_federation: dict[str, Any]) -> None:
    out = latent_federation["out"]
    autoencoder = subset(load_checkpoint(out / "autoencoder.safetensors")[0], "ema")
    for stage in ("slice", "volume", "informed"):
        weights = subset(load_checkpoint(out / f"{stage}.safetensors")[0], "ema")
        codec = {name[len("codec.") :]: t for name, t in weights.items() if name.startswith("codec.")}
        assert codec.keys() == autoencoder.keys()
        assert all(torch.equal(codec[name], autoencoder[name]) for name in codec), stage


def test_each_site_installed_the_autoencoder_once_as_a_base(latent_federation: dict[str, Any]) -> None:
    for index in range(2):
        bases = sorted((latent_federation["root"] / f"site_{index}" / ".gem3d-site").glob("base-*.safetensors"))
        codecs = [path for path in bases if all(name.startswith("codec.") for name in load_checkpoint(path)[0])]
        assert len(codecs) == 1, bases  # one autoencoder base, shared by slice, informed (and the stage-2 base)


def test_the_federated_latent_model_samples(latent_federation: dict[str, Any]) -> None:
    model, cfg, _ = load_model(latent_federation["out"] / "volume.safetensors")
    assert isinstance(model, SliceDenoiser) and model.codec is not None
    mask = torch.zeros((12, 16, 16), dtype=torch.uint8).numpy()
    mask[3:9, 4:12, 4:12] = 2
    informed = InformedSlice(torch.zeros((16, 16)).numpy(), mask[6], "file")
    volume = sample_volumes(model, make_sampler(cfg.diffusion, 2), [SampleRequest(mask, informed, 6, 0)], 4, 1)[0]
    assert volume.shape == (12, 16, 16) and abs(volume).max() <= 1.0
