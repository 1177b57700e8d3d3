"""Where the downstream task's synthetic data comes from: the named arms of PROTOCOL.md section 4.

An arm is a generator (a protocol method) plus GEM-3D's enhancement recipe, stated in full: where
the informed slice comes from and which mask edits are applied. Every arm plans its pairs with
``gem3d.enhance.plan_enhancement`` (random start over the labelled slices, the edits, the informed
slice), the one planning step that ``gem3d enhance`` and the privacy release use too, so an arm is
what a user would get from ``gem3d enhance`` with the same options.

``gem3d`` is the default arm: the paper's enhancement recipe (generated informed slices, random
start positions, edited masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from experiments.evaluation.downstream import Pair
from experiments.evaluation.protocol import SYNTHETIC_SEED_BASE
from experiments.evaluation.utility import Synthesise
from gem3d.data.volume import Volume
from gem3d.enhance import plan_enhancement
from gem3d.errors import ConfigError
from gem3d.masks import parse_edits
from gem3d.sampler import SampleRequest
from gem3d.synthesis import Synthesiser

DEFAULT_EDITS = "rotate:15,elastic:3"  # mild shape edits: new anatomy that stays plausible
Informed = Literal["generate", "copy", "own", "none"]
SampleRequests = Callable[[list[SampleRequest]], list[np.ndarray]]


@dataclass(frozen=True)
class Arm:
    """One source of synthetic training data.

    Attributes:
        name: the arm's name in the report and on the command line.
        method: the generator, a protocol method key (``gem3d``, ``mask_only``, ``full_3d``).
        informed: ``generate`` (the run's informed-slice generator), ``copy`` (another real
            training case's slice at the proportional position), ``own`` (the source case's own
            real slice at the start) or ``none`` (a method without an informed slice).
        mask_edits: a ``gem3d.masks.parse_edits`` spec applied to every synthetic mask ("": none).
        description: one sentence for the report.
    """

    name: str
    method: str
    informed: Informed
    mask_edits: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start": "random over the labelled slices"}


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "gem3d",
            "gem3d",
            "generate",
            DEFAULT_EDITS,
            "GEM-3D's enhancement recipe: generated informed slices, random starts, edited masks",
        ),
        Arm(
            "gem3d-copy",
            "gem3d",
            "copy",
            DEFAULT_EDITS,
            "GEM-3D with informed slices copied from another real training case, random starts, edited masks",
        ),
        Arm(
            "gem3d-own",
            "gem3d",
            "own",
            "",
            "GEM-3D re-rendering each real case: its own real slice, its own unedited mask, a random start",
        ),
        Arm(
            "mask-only",
            "mask_only",
            "none",
            DEFAULT_EDITS,
            "the mask-only baseline (no informed slice), the same edited masks and starts as gem3d",
        ),
        Arm("full-3d", "full_3d", "none", DEFAULT_EDITS, "the full-3D baseline, the same edited masks as gem3d"),
    )
}
"""The arms by name; ``resolve_arms`` refuses an unknown one."""


def resolve_arms(names: Sequence[str]) -> list[Arm]:
    """The arms for ``names`` in order; a ConfigError naming the unknown one and the known ones."""
    arms = []
    for name in names:
        if name not in ARMS:
            raise ConfigError(f"--arms: unknown arm '{name}' (known: {', '.join(ARMS)})")
        arms.append(ARMS[name])
    if not arms:
        raise ConfigError("--arms: name at least one arm")
    return arms


def plan_seed(seed: int, real: int) -> int:
    """The enhancement plan's seed for a downstream seed and a real count: ``100 + 1000 * seed + real``."""
    return SYNTHETIC_SEED_BASE + 1000 * seed + real


def arm_synthesiser(
    arms: Sequence[Arm], samplers: dict[str, SampleRequests], planner: Synthesiser, pool: Sequence[Volume]
) -> Synthesise:
    """The ``utility.Synthesise`` callable for ``arms`` over the real ``pool``.

    Args:
        samplers: method key -> a function sampling ``SampleRequest``s (one ``[D, H, W]`` volume each).
        planner: the evaluated GEM-3D run: its informed-slice generator draws ``generate`` slices.
        pool: the real training pool (model grid); ``copy`` donors and ``transplant`` donors are the
            other cases of the same training set only.
    """
    by_name = {arm.name: arm for arm in arms}
    slice_axis = planner.cfg.data.slice_axis

    def synthesise(name: str, seed: int, indices: Sequence[int], replicates: int) -> list[list[Pair]]:
        arm = by_name[name]
        cases = [pool[i] for i in indices]
        kind = "own" if arm.informed == "none" else arm.informed
        edits = parse_edits(arm.mask_edits, slice_axis) if arm.mask_edits else []
        plans = plan_enhancement(planner, cases, replicates, kind, edits, plan_seed(seed, len(indices)))
        requests = [SampleRequest(p.label.load(), p.informed, p.start, p.seed) for p in plans]
        volumes = samplers[arm.method](requests)
        out: list[list[Pair]] = [[] for _ in cases]
        for request, plan, volume in zip(requests, plans, volumes, strict=True):
            out[plan.source].append((volume, request.mask))
        return out

    return synthesise


__all__ = ["ARMS", "DEFAULT_EDITS", "Arm", "arm_synthesiser", "plan_seed", "resolve_arms"]
