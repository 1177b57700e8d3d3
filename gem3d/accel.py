"""The GPU fast path: bf16 autocast, TF32, fused attention, channels-last and ``torch.compile``.

``accelerate(model, cfg.accel, device)`` puts a network on its device with the switches of
``AccelConfig`` resolved for that device (``auto``: on for CUDA, off on a CPU). What each does:

* **bf16**: the networks run their forward under ``torch.autocast(dtype=bfloat16)`` and return
  fp32 (``SliceDenoiser.compute_dtype``). Only the network is autocast: noising (``NoiseProcess``,
  ᾱ in fp64 cast to the fp32 sample) and every sampler update stay in fp32: bf16 spaces numbers
  near 1 by 2^-8 ≈ 0.004, so ᾱ = 0.9999 (t = 0 of the linear schedule) rounds to 1 and
  ``sqrt(1 - ᾱ)``, the noise of the smallest timesteps, to 0. The loss is taken in fp32.
* **tf32**: ``torch.backends.cuda.matmul.allow_tf32`` and ``cudnn.allow_tf32``.
* **flash_attention**: MONAI's attention blocks call ``F.scaled_dot_product_attention`` (the
  flag ``use_flash_attention`` of ``SABlock``), which picks a fused kernel on the GPU.
* **channels_last**: the 2D convolution weights (and so their activations) in NHWC.
* **compile**: ``nn.Module.compile`` in ``compile_mode`` (state-dict names are unchanged,
  checkpoints stay portable). Every network traces as one graph (``tests/test_accel.py``), the
  stage-2 one included (``networks.inflated_unet_forward``), so ``reduce-overhead`` can replay
  the whole forward as a CUDA graph.
* **deterministic** (CUDA): cuDNN's deterministic algorithms (no autotuning), a fixed cuBLAS
  workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: set before the first matmul) and
  ``torch.use_deterministic_algorithms(True)``, which also makes the fused attention's backward
  pick its deterministic algorithm (with ``warn_only`` it only warns that it did not, and the
  bytes of a brats-size run can differ). Process-wide, like TF32. The bytes are checked on a GPU
  by ``tests/test_cuda.py``; what determinism costs is in RESULTS.md.

Weights, checkpoints and the random draws (drawn on the device, ``gem3d.training``) are the same
with or without the fast path; only rounding differs, so bytes match between runs with the same
switches on the same device (on CUDA, with ``deterministic``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from gem3d.autoencoder import SliceAutoencoder
from gem3d.config import AccelConfig, Switch
from gem3d.networks import InformedSliceGenerator, SliceDenoiser


@dataclass(frozen=True)
class FastPath:
    """``AccelConfig`` resolved for one device: which switches are on."""

    bf16: bool
    tf32: bool
    flash_attention: bool
    channels_last: bool
    compile: bool
    compile_mode: str
    deterministic: bool


def _on(switch: Switch, device: torch.device) -> bool:
    return switch == "on" or (switch == "auto" and device.type == "cuda")


def fast_path(cfg: AccelConfig, device: torch.device) -> FastPath:
    """The switches of ``cfg`` on ``device`` (``auto`` means on for CUDA only)."""
    return FastPath(
        bf16=_on(cfg.bf16, device),
        tf32=cfg.tf32 and device.type == "cuda",
        flash_attention=_on(cfg.flash_attention, device),
        channels_last=_on(cfg.channels_last, device),
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        deterministic=cfg.deterministic and device.type == "cuda",
    )


M = TypeVar("M", bound=nn.Module)


def accelerate(model: M, cfg: AccelConfig, device: torch.device) -> M:
    """``model`` moved to ``device`` with the fast path of ``cfg`` there; in place, returns ``model``.

    Safe to call again (e.g. after ``SliceDenoiser.inflate`` added layers): each switch is set, not toggled.
    """
    path = fast_path(cfg, device)
    if path.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    model.to(device)
    if path.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for module in model.modules():
        if isinstance(module, SABlock) and not module.save_attn and module.rel_positional_embedding is None:
            module.use_flash_attention = path.flash_attention
    if path.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # accepted, not in the stubs
    for module in model.modules():  # the networks and a latent network's codec
        if isinstance(module, SliceDenoiser | InformedSliceGenerator | SliceAutoencoder):
            module.compute_dtype = torch.bfloat16 if path.bf16 else None
    if path.compile and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(mode=path.compile_mode)
    return model
