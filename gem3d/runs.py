"""The run folder: where the stages of one model live, and how each is built and resumed.

A run folder holds ``slice.safetensors``, ``volume.safetensors`` and ``informed.safetensors``
(see ``gem3d.checkpoint``), for a latent model also ``autoencoder.safetensors`` (stage 0, unless
``autoencoder.checkpoint`` names a pretrained one), and ``config.json``. A latent stage
checkpoint holds its frozen codec's weights too, so it samples on its own. It is what every later command accepts as
``--checkpoint``; the federated server writes the same layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gem3d import distributed
from gem3d.accel import accelerate
from gem3d.autoencoder import SliceAutoencoder, latent_scale, load_codec_weights, pretrained_state_dict
from gem3d.checkpoint import (
    library_versions,
    load_checkpoint,
    load_optimizer_tensors,
    load_weights,
    optimizer_tensors,
    prefixed,
    read_metadata,
    save_checkpoint,
    subset,
)
from gem3d.config import Config, config_from_dict
from gem3d.data.volume import Volume, fingerprint
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import CheckpointError, ConfigError
from gem3d.files import write_json, writer_lock
from gem3d.networks import InformedSliceGenerator, SliceDenoiser
from gem3d.training import STAGES, OnStep, Stage, TrainFn, TrainState, freeze_for_stage, new_state, train

STAGE_FILES: dict[Stage, str] = {stage: f"{stage}.safetensors" for stage in STAGES}
# Sections whose change alters the network or what it was trained on; a resume must match them.
_SHAPING_SECTIONS = ("data", "model", "informed", "diffusion", "autoencoder")
# Fields of those sections that do not shape the network a checkpoint holds: a run may be resumed or
# fine-tuned with others. The sampling steps; the autoencoder's training recipe and its source (a
# latent checkpoint carries its codec's weights).
_NOT_SHAPING = {
    "diffusion": ("inference_steps", "eta"),
    "autoencoder": ("reconstruction_loss", "kl_weight", "latent_scale", "checkpoint"),
}
# [train] fields a resume may change: how long, where, how often to checkpoint. Any other (lr, weight
# decay, batch size, EMA decay, seed, ...) is refused: the restored optimizer and EMA would
# keep the old values while the checkpoint recorded the new ones (issue 13).
_RESUME_MAY_CHANGE = (
    "steps_autoencoder",
    "steps_slice",
    "steps_volume",
    "steps_informed",
    "device",
    "checkpoint_every",
    "loader_workers",
    "prefetch_batches",
)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; refuses CUDA where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: '{name}' is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but no CUDA device is available")
    return device


def stage_path(run: str | Path, stage: Stage) -> Path:
    """The checkpoint of ``stage``: ``run`` itself if it is a file, else the stage file inside it."""
    run = Path(run)
    return run if run.is_file() else run / STAGE_FILES[stage]


def build_model(stage: Stage, cfg: Config) -> nn.Module:
    """A fresh network for ``stage`` on the CPU, initialised from ``cfg.train.seed``.

    The volume model is the inflated slice denoiser. A latent network's codec is initialised
    too; ``with_codec`` loads the stage-0 weights into it. The global RNG is left untouched.
    """
    codec = cfg.autoencoder if cfg.model.latent else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if stage == "autoencoder":
            return SliceAutoencoder(cfg.autoencoder, with_discriminator=cfg.autoencoder.adversarial_weight > 0)
        if stage == "informed":
            return InformedSliceGenerator(cfg.informed, cfg.data.num_labels, cfg.model.mask_encoding, codec)
        model = SliceDenoiser(cfg.model, cfg.data.num_labels, codec)
    if stage == "volume":
        model.inflate(cfg.train.seed)
    return model


def checkpoint_bytes(stage: Stage, cfg: Config) -> int:
    """About what training ``stage`` needs on disk: its checkpoint (online and EMA weights, AdamW's
    two moments: 4 float32 copies of the network) twice, as the atomic write keeps the previous
    one until the new one is complete. The network is built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build_model(stage, cfg)
    return 2 * 4 * 4 * sum(p.numel() for p in model.parameters())


def codec_source(cfg: Config, run: str | Path | None) -> Path:
    """Where a latent model's autoencoder comes from: ``autoencoder.checkpoint``, else ``run``'s stage 0."""
    if cfg.autoencoder.checkpoint is not None:
        path = Path(cfg.autoencoder.checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"autoencoder.checkpoint: {path}: no such file (a local pretrained autoencoder)")
        return path
    if run is None or not (Path(run) / STAGE_FILES["autoencoder"]).exists():
        where = f"{run}/{STAGE_FILES['autoencoder']}" if run is not None else "this run"
        raise CheckpointError(
            f"{where}: a latent model (model.latent = true) needs its autoencoder: train --stage autoencoder "
            "into this --out first, or set autoencoder.checkpoint to a local pretrained one"
        )
    return Path(run) / STAGE_FILES["autoencoder"]


def load_codec(cfg: Config, source: Path) -> SliceAutoencoder:
    """The autoencoder of ``cfg.autoencoder`` with the weights in ``source`` (``pretrained_state_dict``).

    The latent scale is ``autoencoder.latent_scale`` when that is a number (it overrides the
    file's), else the file's (1.0 for another tool's state dict, which has none).
    """
    codec = SliceAutoencoder(cfg.autoencoder)
    weights = pretrained_state_dict(source)
    if isinstance(cfg.autoencoder.latent_scale, float):
        weights["scale"] = torch.tensor(cfg.autoencoder.latent_scale)
    load_codec_weights(codec, weights, f"{source} (autoencoder weights)")
    return codec


def with_codec(model: nn.Module, codec: SliceAutoencoder) -> nn.Module:
    """``model`` with ``codec``'s weights in its frozen codec (a latent network), in place."""
    own = getattr(model, "codec", None)
    if not isinstance(own, SliceAutoencoder):
        raise ValueError("with_codec: not a latent network")
    own.load_state_dict(codec.state_dict())
    return model


def frozen_part(stage: Stage, cfg: Config) -> Literal["slice", "codec"] | None:
    """What of ``stage``'s network neither trains nor follows from the seed, so a federated site
    must be given it once (a "base"): the stage-1 network under a frozen stage 2 (``slice``), a
    latent network's autoencoder (``codec``), or nothing."""
    if stage == "volume" and not cfg.train.volume_train_all:
        return "slice"
    if cfg.model.latent and stage != "autoencoder":
        return "codec"
    return None


def checkpoint_config(metadata: dict[str, Any], path: Path) -> Config:
    """The config embedded in a checkpoint's metadata, validated."""
    if metadata.get("config") is None:
        raise CheckpointError(f"{path}: metadata has no embedded config")
    try:
        return config_from_dict(metadata["config"], f"{path} (embedded config)")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def checkpoint_stage(metadata: dict[str, Any], path: Path) -> Stage:
    """The stage a checkpoint holds; it must be one of ``STAGES`` and agree with a stage file's name."""
    stage = metadata["stage"]
    if stage not in STAGES:
        raise CheckpointError(f"{path}: metadata stage '{stage}' is not one of {', '.join(STAGES)}")
    named = next((s for s, name in STAGE_FILES.items() if path.name == name), None)
    if named is not None and named != stage:
        raise CheckpointError(f"{path}: holds a '{stage}'-stage checkpoint but is named {path.name}")
    return stage  # type: ignore[no-any-return]


def _check_compatible(metadata: dict[str, Any], cfg: Config, path: Path) -> None:
    saved = checkpoint_config(metadata, path).model_dump(mode="json")
    current = cfg.model_dump(mode="json")
    for section in _SHAPING_SECTIONS:
        if section == "autoencoder" and not (cfg.model.latent or saved["model"]["latent"]):
            continue  # a pixel model has no autoencoder
        ignored = _NOT_SHAPING.get(section, ())
        if _without(saved[section], ignored) != _without(current[section], ignored):
            raise CheckpointError(
                f"{path}: checkpoint was trained with a different [{section}] config; "
                "use the run's own config.json or a new --out"
            )


def _check_resumable(metadata: dict[str, Any], cfg: Config, path: Path) -> None:
    """A resume continues the saved optimisation: its [train] settings must be the checkpoint's."""
    saved = checkpoint_config(metadata, path).train.model_dump(mode="json")
    current = cfg.train.model_dump(mode="json")
    for name, value in current.items():
        if name not in _RESUME_MAY_CHANGE and saved[name] != value:
            raise CheckpointError(
                f"{path}: --resume with train.{name} = {value!r}, but the checkpoint was trained with "
                f"train.{name} = {saved[name]!r}; resume with the run's value or train into a new --out"
            )


def _without(fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in names}


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Build the network stored in a checkpoint and load its ``ema`` (or ``model``) weights.

    Returns:
        ``(model in eval mode, the checkpoint's config, its metadata)``.
    """
    path = Path(path)
    tensors, metadata = load_checkpoint(path)
    stage = checkpoint_stage(metadata, path)
    cfg = checkpoint_config(metadata, path)
    model = build_model(stage, cfg)
    load_weights(model, subset(tensors, weights), f"{path} ({weights} weights)")
    return accelerate(model, cfg.accel, torch.device(device)).eval(), cfg, metadata


def export_weights(source: str | Path, target: str | Path, **extra: Any) -> Path:
    """Write ``source``'s EMA weights alone to ``target``: a small checkpoint to start from, not to resume.

    Keeps ``ema.*`` and the metadata (stage, step, config, data fingerprint, privacy record), drops
    the online weights, optimizer and generator; ``extra`` fields are added (e.g. a data recipe).
    ``load_model``, ``--init`` and a federated run's ``init`` read it like any checkpoint.
    """
    tensors, metadata = load_checkpoint(source)
    kept = {name: tensor for name, tensor in tensors.items() if name.startswith("ema.")}
    fields = _without(metadata, ("optimizer", "format", "tensors_sha256", "metadata_sha256"))
    return save_checkpoint(target, kept, {**fields, "weights_only": True, **extra})


def state_tensors(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON fields that capture a ``TrainState`` completely."""
    optim, param_groups = optimizer_tensors(state.optimizer)
    tensors = {
        **prefixed(state.model.state_dict(), "model"),
        **prefixed(state.ema.module.state_dict(), "ema"),
        **optim,
        "ema_n_averaged": state.ema.n_averaged,
    }
    return tensors, {"step": state.step, "optimizer": param_groups}


def save_state(path: Path, state: TrainState, stage: Stage, cfg: Config, data_fingerprint: str, **extra: Any) -> Path:
    tensors, fields = state_tensors(state)
    metadata = {
        **fields,
        "stage": stage,
        "config": cfg.model_dump(mode="json"),
        "data_fingerprint": data_fingerprint,
        "versions": library_versions(),
        **extra,
    }
    return save_checkpoint(path, tensors, metadata)


def restore_state(
    state: TrainState, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Load a saved ``TrainState`` in place (model, EMA, optimizer, step).

    There is no generator state: step n's draws depend on the run's seed and n alone
    (``gem3d.training.train``), and a resume keeps the seed (``_RESUME_MAY_CHANGE``).

    Raises:
        CheckpointError: naming ``source``, when the checkpoint is not a complete training state.
    """
    absent = [name for name in ("ema_n_averaged",) if name not in tensors]
    absent += [name for name in ("step", "optimizer") if metadata.get(name) is None]
    if absent:
        raise CheckpointError(f"{source}: not a resumable training checkpoint (no {', '.join(absent)})")
    device = next(state.model.parameters()).device
    load_weights(state.model, subset(tensors, "model"), f"{source} (model weights)")
    load_weights(state.ema.module, subset(tensors, "ema"), f"{source} (ema weights)")
    try:
        state.ema.n_averaged.copy_(tensors["ema_n_averaged"].to(device))
        load_optimizer_tensors(state.optimizer, tensors, metadata["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{source}: optimizer state does not fit ({error})") from None
    state.step = int(metadata["step"])


def init_checkpoint(init: str | Path, stage: Stage) -> Path:
    """The checkpoint file ``init`` names for ``stage``: the file itself, or the stage's file in a run folder.

    A run folder's volume stage falls back to its slice checkpoint (inflated by ``initial_model``).
    """
    init = Path(init)
    if init.is_file():
        return init
    if not init.is_dir():
        raise CheckpointError(f"{init}: no such checkpoint file or run folder")
    for candidate in (stage, "slice") if stage == "volume" else (stage,):
        path = init / STAGE_FILES[candidate]
        if path.exists():
            return path
    raise CheckpointError(f"{init}: run folder has no {STAGE_FILES[stage]} to start the {stage} stage from")


def initial_model(
    stage: Stage, cfg: Config, run: str | Path | None, init: str | Path | None, device: torch.device
) -> nn.Module:
    """The model a new ``stage`` starts from (weights only: the optimizer starts fresh).

    * ``init`` given: its EMA weights, e.g. a model pre-trained on public data that a site
      fine-tunes. It must be the same stage, or for the volume stage a slice checkpoint, which is
      inflated. Its model config must match ``cfg``'s.
    * otherwise the volume stage starts from ``run``'s slice checkpoint, inflated; the other
      stages start from a seeded random initialisation, a latent one with the codec of
      ``codec_source`` (a started checkpoint brings its own).
    """
    if init is None and stage != "volume":
        model = build_model(stage, cfg)
        if cfg.model.latent and stage != "autoencoder":
            with_codec(model, load_codec(cfg, codec_source(cfg, run)))
        return model.to(device)
    if init is not None:
        source = init_checkpoint(init, stage)
    else:
        assert run is not None
        source = Path(run) / STAGE_FILES["slice"]
        if not source.exists():
            raise CheckpointError(
                f"{source}: no slice-stage checkpoint to start the volume stage from; "
                "run --stage slice with this --out first, or pass --init"
            )
    model, _, metadata = load_model(source, "ema", device)
    allowed = ("slice", "volume") if stage == "volume" else (stage,)
    if metadata["stage"] not in allowed:
        raise CheckpointError(
            f"{source}: cannot start the {stage} stage from a '{metadata['stage']}'-stage checkpoint "
            f"(expected {' or '.join(allowed)})"
        )
    _check_compatible(metadata, cfg, source)
    if stage == "volume" and metadata["stage"] == "slice":
        assert isinstance(model, SliceDenoiser)
        model.inflate(cfg.train.seed)
    return model


def train_stage(
    cfg: Config,
    volumes: list[Volume],
    stage: Stage,
    run: str | Path,
    steps: int | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    on_step: OnStep | None = None,
    train_fn: TrainFn = train,
    fingerprint_key: bytes | None = None,
    extra_metadata: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Train one stage into the run folder ``run`` and checkpoint it.

    Args:
        steps: total steps for this stage (default ``cfg.train.steps_<stage>``); with ``resume``
            training continues from the saved step up to this total.
        init: a checkpoint (file or run folder) whose weights this stage starts from instead of
            a fresh initialisation (``run``'s slice checkpoint for the volume stage); see
            ``initial_model``. Ignored with ``resume``.
        train_fn: the step loop, ``gem3d.training.train`` or a drop-in (e.g. DP-SGD from ``privacy/``).
        fingerprint_key: the site's secret; the data fingerprint in the checkpoint is then keyed
            (see ``gem3d.data.volume.fingerprint``).
        extra_metadata: called at every checkpoint for more metadata fields (e.g. the privacy
            record, whose ε changes as training goes on).
    Under several processes (``gem3d.distributed``) every rank calls this alike and trains on its
    own device; only rank 0 writes the run folder (lock, config, checkpoints), and a failure on
    any rank in setting up or checkpointing ends them all (``distributed.agreed``).

    Returns:
        the metrics of ``gem3d.training.train`` plus ``step`` (the stage's total steps).
    """
    run = Path(run)
    total = steps if steps is not None else getattr(cfg.train, f"steps_{stage}")
    current = distributed.world()
    device = distributed.agreed(lambda: distributed.rank_device(resolve_device(cfg.train.device), current))
    with contextlib.ExitStack() as held:
        # two trainings into one run folder: the second is refused, not raced; under several
        # processes the leader holds the lock for them all
        distributed.agreed(lambda: held.enter_context(writer_lock(run)) if current.leader else None)
        return _train_stage(cfg, volumes, stage, run, total, resume, init, on_step, train_fn, fingerprint_key,
                            extra_metadata, device)  # fmt: skip


def _train_stage(
    cfg: Config,
    volumes: list[Volume],
    stage: Stage,
    run: Path,
    total: int,
    resume: bool,
    init: str | Path | None,
    on_step: OnStep | None,
    train_fn: TrainFn,
    fingerprint_key: bytes | None,
    extra_metadata: Callable[[], dict[str, Any]] | None,
    device: torch.device,
) -> dict[str, float]:
    path = run / STAGE_FILES[stage]
    data_fingerprint = fingerprint(volumes, fingerprint_key)
    leader = distributed.world().leader

    def setup() -> TrainState:
        state = _start_state(cfg, volumes, stage, run, path, resume, init, data_fingerprint, device)
        if leader:
            write_json(run / "config.json", cfg.model_dump(mode="json"))
        return state

    state = distributed.agreed(setup)  # a refusal on any rank (or the leader's write) ends them all
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    process = noise_process(cfg.diffusion)
    # "auto" measures the latent scale on the training slices: not for DP-SGD (outside its mechanism)
    measures_scale = cfg.autoencoder.latent_scale == "auto" and train_fn is train
    every = cfg.train.checkpoint_every
    metrics: dict[str, float] = {}

    def checkpoint() -> None:
        def write() -> None:
            if leader:
                extra = extra_metadata() if extra_metadata is not None else {}
                save_state(path, state, stage, cfg, data_fingerprint, num_cases=len(volumes), **extra)

        distributed.agreed(write)  # a full disk at the leader ends every rank, not just the leader

    while state.step < total:
        until = min(total, state.step + every) if every else total
        metrics = train_fn(state, process, source, stage, until, cfg.train, on_step)
        if stage == "autoencoder" and state.step >= total and measures_scale:
            set_latent_scale(state, source, cfg.train.seed)
        checkpoint()
    if not path.exists():  # zero steps asked: still leave a loadable checkpoint
        checkpoint()
    return {**metrics, "step": float(state.step)}


def _start_state(
    cfg: Config,
    volumes: list[Volume],
    stage: Stage,
    run: Path,
    path: Path,
    resume: bool,
    init: str | Path | None,
    data_fingerprint: str,
    device: torch.device,
) -> TrainState:
    """The state ``stage`` starts from: fresh (or from ``init``), or the checkpoint at ``path`` resumed."""
    if path.exists() and not resume:
        raise CheckpointError(f"{path}: already exists; pass --resume to continue it, or choose another --out")
    if resume and not path.exists():
        raise CheckpointError(f"{path}: nothing to resume")
    if resume:
        tensors, metadata = load_checkpoint(path)
        checkpoint_stage(metadata, path)
        _check_compatible(metadata, cfg, path)
        _check_resumable(metadata, cfg, path)
        if metadata.get("data_fingerprint") != data_fingerprint:
            raise CheckpointError(f"{path}: was trained on different data (fingerprint mismatch)")
        model = build_model(stage, cfg).to(device)
    else:
        model = initial_model(stage, cfg, run, init, device)
    accelerate(model, cfg.accel, device)  # again after an inflate: its new layers get the switches too
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    state = new_state(model, cfg.train)
    if resume:
        restore_state(state, tensors, metadata, str(path))
    if stage == "autoencoder" and isinstance(cfg.autoencoder.latent_scale, float):
        for module in (state.model, state.ema.module):
            assert isinstance(module, SliceAutoencoder)
            module.scale.fill_(cfg.autoencoder.latent_scale)
    return state


# Training slices the latent scale is measured on (a seeded draw, one slice per draw).
_SCALE_SLICES = 64


def set_latent_scale(state: TrainState, source: WindowSource, seed: int) -> None:
    """Set the trained autoencoder's (and its EMA's) ``scale`` to 1 / std of the EMA's latents of
    ``_SCALE_SLICES`` seeded training slices (``autoencoder.latent_scale = "auto"``)."""
    codec, model = state.ema.module, state.model
    assert isinstance(codec, SliceAutoencoder) and isinstance(model, SliceAutoencoder)
    device = next(codec.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(source), (_SCALE_SLICES,), generator=generator).tolist()
    scale = latent_scale(codec, source.slices(indices, generator).image.to(device))
    for module in (codec, model):
        module.scale.fill_(scale)


def stage_metadata(run: str | Path, stage: Stage) -> dict[str, Any]:
    """Metadata of a stage's checkpoint in a run folder (or of a checkpoint file)."""
    return read_metadata(stage_path(run, stage))
