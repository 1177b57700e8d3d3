"""One site on several processes (``gem3d.distributed``): 2 gloo processes on CPU against one process.

Non-DP training must give the single process's weights for the same global batch; DP-SGD must
add the clipped per-patient gradients of all ranks and the mechanism's noise once, spend the
ledger once, and leave every rank with the same weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gem3d import distributed
from gem3d.checkpoint import read_metadata
from gem3d.config import Config, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import ConfigError, Gem3dError
from gem3d.runs import build_model
from gem3d.training import freeze_for_stage, new_state, train
from tests.conftest import MICRO

WORLD = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, size: int, port: int, job: Callable[..., Any], out: Path, kwargs: dict[str, Any]) -> None:
    """One rank: join a gloo group of ``size`` on localhost, run ``job``, save what it returns to ``out/rank.pt``."""
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=distributed.TIMEOUT)
    try:
        torch.save(job(**kwargs), out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(job: Callable[..., Any], tmp_path: Path, size: int = WORLD, **kwargs: Any) -> list[Any]:
    """What ``job(**kwargs)`` returns on each of ``size`` gloo ranks (a module-level function: spawn pickles it)."""
    out = tmp_path / f"ranks-{job.__name__}"
    out.mkdir()
    mp.spawn(_worker, args=(size, free_port(), job, out, kwargs), nprocs=size, join=True)
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(size)]


def _cfg(batch_size: int = 4) -> Config:
    return config_from_dict({**MICRO, "train": {**MICRO["train"], "batch_size": batch_size}}, "micro")


def _train(stage: str, data: Path, steps: tuple[int, ...], batch_size: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Train a fresh micro ``stage`` network, stopping at each of ``steps`` (as checkpoints do); its weights."""
    cfg = _cfg(batch_size)
    model = build_model(stage, cfg)  # type: ignore[arg-type]
    if stage == "volume":  # a trained base, as after stage 1: a fresh one's zero output layer stops every gradient
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    freeze_for_stage(model, stage, False)  # type: ignore[arg-type]
    state = new_state(model, cfg.train)
    source = WindowSource(load_volumes(data, cfg.data), cfg.data.window)
    norms: list[float] = []
    process = noise_process(cfg.diffusion)
    metrics = [
        train(state, process, source, stage, until, cfg.train, lambda m: norms.append(m["grad_norm"]))  # type: ignore[arg-type]
        for until in steps
    ]
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in state.ema.module.state_dict().items()},
        "grad": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},  # the last step's
        "curve": {"loss": torch.tensor([m["loss"] for m in metrics]), "grad_norm": torch.tensor(norms)},
    }


# The ranks' gradient sums are ordered differently from one process's: float32 rounding, ~1e-7
# relative. Gradients and their norms (which would show a missed all-reduce, a wrong shard or a
# sum in place of a mean) are compared at that level. Weights get lr / 20: AdamW moves every
# coordinate by up to ~lr whatever its gradient's size, so a coordinate whose true gradient is 0
# (an attention key's bias: softmax ignores it) moves by a fraction of lr on rounding alone.
GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
WEIGHT_TOLERANCE = {"rtol": 0.0, "atol": MICRO["train"]["lr"] / 20}  # type: ignore[index]


STAGES = ("slice", "volume", "informed")
STEPS = (2, 4)  # two calls, as between checkpoints: the second DDP wrapper must not add to the first


def _refused_batch(data: Path) -> str:
    try:
        _train("slice", data, (1,), batch_size=3)
    except ConfigError as error:
        return str(error)
    return ""


def _every_stage(data: Path) -> dict[str, Any]:
    """On each rank: every stage trained as ``_train`` does, and the refusal of an uneven global batch
    (one group of processes for all of them: each start costs seconds of imports)."""
    ran: dict[str, Any] = {stage: _train(stage, data, STEPS) for stage in STAGES}
    ran["refused"] = _refused_batch(data)
    return ran


@pytest.fixture(scope="module")
def two_ranks(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_every_stage, tmp_path_factory.mktemp("ranks"), data=phantom_dir)


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(
    phantom_dir: Path, two_ranks: list[dict[str, Any]], stage: str
) -> None:
    torch.set_num_threads(1)
    single = _train(stage, phantom_dir, STEPS)

    ranks = [ran[stage] for ran in two_ranks]

    assert ranks[0]["model"].keys() == single["model"].keys()  # no "module." prefix
    assert ranks[0]["grad"].keys() == single["grad"].keys()
    for rank in ranks:
        torch.testing.assert_close(rank["curve"], single["curve"], rtol=1e-5, atol=0)
        for name, value in single["grad"].items():
            torch.testing.assert_close(rank["grad"][name], value, **GRAD_TOLERANCE, msg=f"grad of {name}")
        for part in ("model", "ema"):
            for name, value in single[part].items():
                torch.testing.assert_close(rank[part][name], value, **WEIGHT_TOLERANCE, msg=f"{part}.{name}")
    # every rank holds the same weights, bit for bit (the all-reduced gradient is the same everywhere)
    assert all(torch.equal(ranks[0]["model"][n], ranks[1]["model"][n]) for n in single["model"])
    start = _train(stage, phantom_dir, (0,))["model"]
    changed = [n for n in start if not torch.equal(start[n], single["model"][n])]
    assert changed and all(".slice_" in n for n in changed) == (stage == "volume")  # trained; a frozen base stays


def test_a_global_batch_not_divisible_by_the_processes_is_refused(
    phantom_dir: Path, two_ranks: list[dict[str, Any]]
) -> None:
    messages = [ran["refused"] for ran in two_ranks]

    assert all("train.batch_size = 3" in m and "divisible by the 2 processes" in m for m in messages)
    assert _refused_batch(phantom_dir) == ""  # one process takes any batch


# --- DP-SGD across ranks -------------------------------------------------------------------------


def _dp_aggregate(per_sample: list[torch.Tensor], sigma: float, seed: int | None) -> dict[str, torch.Tensor]:
    """The update ``dp_optimizer`` makes of ``per_sample`` gradients ``[n, 64, 64]`` (this rank's share
    ``distributed.split``), noise from ``seed`` on rank 0 (a secret generator for ``None``)."""
    from privacy.dp_sgd import dp_optimizer, secret_generator

    weight = torch.nn.Parameter(torch.zeros(64, 64))
    current = distributed.world()
    generator = None
    if current.leader:
        generator = torch.Generator().manual_seed(seed) if seed is not None else secret_generator()
    optimizer = dp_optimizer(torch.optim.SGD([weight], lr=0.0), sigma, 1.0, 4, generator)
    share = distributed.split(per_sample, current)
    weight.grad_sample = torch.stack(share) if share else torch.zeros(0, 64, 64)  # type: ignore[attr-defined]
    optimizer.step()
    assert weight.grad is not None
    return {"grad": weight.grad.clone()}


def _dp_aggregates(per_sample: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "seeded": _dp_aggregate(per_sample, 0.5, seed=7),
        "noise_only": _dp_aggregate([], 1.0, seed=None),  # no patient: the update is the noise alone
    }


DP_STEPS = 12


def _dp_jobs(per_sample: list[torch.Tensor], data: Path, ledger_path: Path) -> dict[str, Any]:
    """On each rank: the mechanism's aggregates and a DP-SGD training (one group of processes for both)."""
    return {**_dp_aggregates(per_sample), "train": _dp_train(data, ledger_path, DP_STEPS)}


@pytest.fixture(scope="module")
def dp_ranks(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[torch.Tensor], Path, list[Any]]:
    """The five per-patient gradients, the DP training's ledger and what each rank returned."""
    generator = torch.Generator().manual_seed(0)
    # five patients, norms from ~0.3 to ~3: some clipped to C = 1, some not
    per_sample = [torch.randn(64, 64, generator=generator) * scale / 64 for scale in (0.3, 0.8, 1.5, 2.0, 3.0)]
    folder = tmp_path_factory.mktemp("dp")
    ledger_path = folder / "site" / "privacy_ledger.json"
    ranks = run_ranks(_dp_jobs, folder, per_sample=per_sample, data=phantom_dir, ledger_path=ledger_path)
    return per_sample, ledger_path, ranks


def test_two_ranks_add_their_clipped_gradients_and_the_noise_of_one_process(dp_ranks) -> None:
    per_sample, _, ranks = dp_ranks
    clipped = sum(g * min(1.0, 1.0 / (float(g.norm()) + 1e-6)) for g in per_sample)
    noise = torch.normal(0.0, 0.5 * 1.0, (64, 64), generator=torch.Generator().manual_seed(7))

    expected = (clipped + noise) / 4  # one process: (clipped sum + N(0, σ²C²)) / expected batch

    for rank in ranks:
        torch.testing.assert_close(rank["seeded"]["grad"], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(ranks[0]["seeded"]["grad"], ranks[1]["seeded"]["grad"])


def test_the_noise_is_added_once_not_once_per_rank(dp_ranks) -> None:
    _, _, ranks = dp_ranks
    update = ranks[0]["noise_only"]["grad"]

    # σ C / E = 0.25 for noise drawn once; 0.25 √2 = 0.354 had each rank added its own
    assert float(update.std()) == pytest.approx(0.25, rel=0.05)
    assert torch.equal(update, ranks[1]["noise_only"]["grad"])  # the same update everywhere


def _dp_train(data: Path, ledger_path: Path, steps: int) -> dict[str, Any]:
    """DP-SGD of a micro slice stage at q = 1/4 on every rank; rank 0 holds the ledger. First an
    over-budget request (refused on every rank), then ``steps`` steps."""
    from privacy.dp_sgd import train_private
    from privacy.ledger import PrivacyLedger

    cfg = config_from_dict(
        {**MICRO, "train": {**MICRO["train"], "batch_size": 1}, "privacy": {"enabled": True, "budget_epsilon": 50.0}},
        "micro dp",
    )
    current = distributed.world()
    ledger = PrivacyLedger.open(ledger_path, cfg.privacy) if current.leader else None
    model = build_model("slice", cfg)
    state = new_state(model, cfg.train)
    source = WindowSource(load_volumes(data, cfg.data), cfg.data.window)
    process = noise_process(cfg.diffusion)
    refused = ""
    try:
        train_private(state, process, source, "slice", 10**6, cfg.train, privacy_cfg=cfg.privacy, ledger=ledger)
    except Exception as error:  # rank 0: the budget; the others: PeerError with its message
        refused = f"{type(error).__name__}: {error}"
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict[str, float]] = []
    metrics = train_private(
        state, process, source, "slice", steps, cfg.train, seen.append, privacy_cfg=cfg.privacy, ledger=ledger
    )
    return {
        "refused": refused,
        "start": start,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in state.ema.module.state_dict().items()},
        "metrics": metrics,
        "seen": seen,
        "grad_sample_left": any(hasattr(p, "grad_sample") for p in model.parameters()),
    }


def test_dp_sgd_on_two_ranks_spends_the_ledger_once_and_leaves_every_rank_the_same_weights(dp_ranks) -> None:
    from privacy.dp_sgd import sample_rate
    from privacy.ledger import PrivacyLedger

    steps = DP_STEPS
    _, ledger_path, both = dp_ranks

    ranks = [ran["train"] for ran in both]

    ledger = PrivacyLedger.read(ledger_path)
    assert ledger.history == [(1.0, sample_rate(1, 4), steps)]  # one spend of 12 steps at q = 1/4, not two
    assert ranks[0]["refused"].startswith("PrivacyBudgetError") and "budget" in ranks[0]["refused"]
    assert ranks[1]["refused"] == "PeerError: " + ranks[0]["refused"].split(": ", 1)[1]
    for rank in ranks:
        assert rank["metrics"]["epsilon"] == pytest.approx(ledger.epsilon) and rank["metrics"]["steps"] == steps
        assert not rank["grad_sample_left"]
    for part in ("model", "ema"):
        assert all(torch.equal(ranks[0][part][n], ranks[1][part][n]) for n in ranks[0][part])
    assert any(not torch.equal(ranks[0]["start"][n], ranks[0]["model"][n]) for n in ranks[0]["start"])
    # every rank saw the same (secret, shared) Poisson sample sizes; with one patient expected per
    # step, rank 1 had no patient in most steps (P(no step has under 2) = 0.26^12) and the run went on
    sizes = [m["batch_size"] for m in ranks[0]["seen"]]
    assert sizes == [m["batch_size"] for m in ranks[1]["seen"]] and len(sizes) == steps
    assert any(size < 2 for size in sizes)


# --- gem3d train under torchrun ------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
MICRO_SET = ["--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'"]
MICRO_SET += ["--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4"]
MICRO_SET += ["--set", "model.num_head_channels=8", "--set", "train.checkpoint_every=2"]


def torchrun_train(*options: str, processes: int = WORLD) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node N -m experiments.cli train OPTIONS`` from the repository."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "experiments.cli", "train", *MICRO_SET, *options]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_gem3d_train_under_torchrun_writes_the_weights_of_one_process(phantom_dir: Path, tmp_path: Path) -> None:
    from experiments.cli import main

    common = ["--data", str(phantom_dir), "--stage", "slice", "--steps", "3", "--set", "train.batch_size=4"]
    common += ["--site-state", str(tmp_path / "site")]
    assert main(["train", *MICRO_SET, *common, "--out", str(tmp_path / "one")]) == 0

    done = torchrun_train(*common, "--out", str(tmp_path / "two"))

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("slice: step 3") == 1  # rank 0 alone reports
    one = load_file(tmp_path / "one" / "slice.safetensors")
    two = load_file(tmp_path / "two" / "slice.safetensors")
    assert one.keys() == two.keys()
    for name in (n for n in one if n.startswith(("model.", "ema."))):
        torch.testing.assert_close(two[name], one[name], **WEIGHT_TOLERANCE, msg=name)
    assert read_metadata(tmp_path / "two" / "slice.safetensors")["step"] == 3


def test_gem3d_train_under_torchrun_refuses_bad_input_in_one_line_on_every_rank(
    phantom_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    done = torchrun_train(
        "--data", str(phantom_dir), "--stage", "slice", "--out", str(out), "--set", "train.batch_size=3",
        "--site-state", str(tmp_path / "site"),
    )  # fmt: skip

    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("gem3d train")]
    assert ours == ["gem3d train: error: train.batch_size = 3: must be divisible by the 2 processes training this "
                    "site (the global batch is split evenly; e.g. 4)"]  # fmt: skip
    assert "/gem3d/" not in done.stderr  # no traceback of ours (torchrun prints its own summary)
    assert not out.exists()


def test_a_volume_stage_under_torchrun_without_its_slice_stage_ends_every_rank(
    phantom_dir: Path, tmp_path: Path
) -> None:
    done = torchrun_train(
        "--data", str(phantom_dir), "--stage", "volume", "--out", str(tmp_path / "run"),
        "--site-state", str(tmp_path / "site"),
    )  # fmt: skip

    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("gem3d train")]
    assert len(ours) == 1 and "no slice-stage checkpoint" in ours[0], done.stderr[-2000:]


# --- a Flower site with several processes --------------------------------------------------------


def test_a_site_round_on_two_processes_replies_the_weights_of_one(phantom_dir: Path, tmp_path: Path) -> None:
    from client.task import Site, locate_site, train_round
    from tests.test_federated_site import global_weights, make_job

    cfg = _cfg(batch_size=4)
    one = Site(name="site_0", data_dir=phantom_dir, state_dir=tmp_path / "state", index=0)
    two = locate_site({"data-dir": str(phantom_dir), "state-dir": str(tmp_path / "state"), "train-processes": 2}, {})
    assert two.processes == 2
    job = make_job(cfg)

    single, single_reply = train_round(one, job, global_weights(cfg))
    weights, reply = train_round(two, job, global_weights(cfg))

    assert weights.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(weights[name], value, **WEIGHT_TOLERANCE, msg=name)
    assert reply["loss"] == pytest.approx(single_reply["loss"], rel=1e-5) and reply["steps"] == 2


def test_a_site_refuses_a_bad_process_count_and_an_uneven_batch(phantom_dir: Path, tmp_path: Path) -> None:
    from client.task import locate_site, train_round
    from tests.test_federated_site import global_weights, make_job

    with pytest.raises(ConfigError, match="train-processes"):
        locate_site({"data-dir": str(phantom_dir), "train-processes": 0}, {})
    site = locate_site({"data-dir": str(phantom_dir), "state-dir": str(tmp_path / "s"), "train-processes": 2}, {})

    with pytest.raises(Gem3dError, match=r"train\.batch_size = 3"):
        train_round(site, make_job(_cfg(batch_size=3)), global_weights(_cfg(batch_size=3)))
