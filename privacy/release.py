"""The release gate: generated cases leave a site only under the privacy policy.

Given already-generated cases (image, label, affine, provenance, informed slice), ``release_cohort``:
1. enforces the policy: every informed slice is *generated* (``real``, ``copy`` and ``file``
   carry a real patient's pixels into the "synthetic" volume and are refused), and checked by
   its pixels against every real training slice, at every position, flipped and rotated by
   multiples of 90 degrees (a match is refused whatever its declared source; a case without
   its informed slice is refused); every mask is changed by at least ``min_mask_edits`` edits
   that change the anatomy's shape (flips, 90-degree rotations, relabelling and label removal
   do not count: ``changes_anatomy``), or is itself generated;
2. checks the model's privacy statement (``privacy.model_privacy``): every stage trained on
   private data was trained with DP-SGD (its weights' origins included), unless the policy
   explicitly allows a non-DP model; the report carries the patient-level ε (maximum over
   sites, each site's ledger composing its stages) and, apart, any client-level ε;
3. writes the cohort to a working folder beside ``out`` (never the system temp dir; marked
   ``INCOMPLETE-NOT-A-RELEASE``; a killed release's folder is removed by the next release)
   with scrubbed NIfTI headers (fresh headers carrying only geometry; descrip, aux_file,
   db_name and intent_name empty; no extensions) and pseudonymous case ids: sorted random ids
   given to the cases in a secret random order, so neither names nor order follow the sources;
4. runs the memorization audit on exactly those files against the training set (and a
   holdout, if given) and refuses if any copy is found; for a model trained at several sites,
   every site audits the same candidates against its own patients (``site_audit``, a Flower
   audit round: ``server/audit.py``) and the release is refused unless every site that
   trained the model passes;
5. only then moves the folder into place, with ``privacy_report.json`` (ε, δ, accountant, what
   they guarantee, audit figures without case ids, the policy applied) and per-case
   provenance that names no source case, site, path or date.

A refusal raises ``ReleasePolicyError`` or ``ReleaseRefusedError`` and leaves nothing at ``out``.

``release_dataset`` is the whole of ``gem3d release`` behind the command line: it checks the
mask edits and the model's privacy before generating anything, plans the enhanced cases
(``gem3d.enhance.enhancement_jobs`` with generated informed slices), runs the checks of step 1 on
the plan, then samples the cases in their secret order a batch at a time and writes each one
into the working folder as its batch ends (steps 3 to 5 as ``release_cohort``): memory holds one
batch, not the cohort (issue 16). Meanwhile the site's cases on the model grid and their edited
masks wait in a private temporary folder (``gem3d.data.spill``: mode 0700 under ``$TMPDIR``,
removed when the release ends, refused or not); they are the site's own data and unreleased
masks derived from it, and no generated volume is ever written there.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from gem3d.checkpoint import library_versions
from gem3d.config import Config, DataConfig
from gem3d.data.dataset import RawVolumes, load_volumes, warn_if_partial
from gem3d.data.nnunet_raw import case_files, dataset_folders, dataset_json, read_grid_cases
from gem3d.data.spill import LazySequence, Spill, SpilledCase, reordered, spilled_volumes
from gem3d.data.volume import Volume
from gem3d.enhance import enhancement_jobs
from gem3d.errors import ConfigError, DataError
from gem3d.files import AtomicFolder, atomic_write, write_json
from gem3d.sampler import OnProgress
from gem3d.synthesis import Job, Synthesiser, iter_jobs
from privacy.audit import AuditSettings, check_holdout_disjoint, check_reference, dihedral, memorization_audit
from privacy.errors import ReleasePolicyError, ReleaseRefusedError
from privacy.linkage import linkage_test
from privacy.model_privacy import statement

REPORT_FORMAT = "gem3d-privacy-report/1"
SCRUBBED_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")
INFORMED_KINDS = ("real", "copy", "file", "generate")


@dataclass(frozen=True)
class ReleasePolicy:
    """What a privacy release demands.

    Attributes:
        min_mask_edits: edits that changed the anatomy's shape of each mask (``changes_anatomy``;
            ignored for generated masks).
        informed_copy_rms: an informed slice whose RMS difference to any real training slice
            (intensities in [-1, 1]) is below this counts as copied, whatever its declared source.
        require_dp: refuse a model with a stage trained on private data without DP-SGD.
        max_linkage_rate: refuse when more than this fraction of released masks have their
            source as nearest training mask (``privacy.linkage``); chance is 1 / training cases.
        audit_every_site: refuse a model trained at several sites unless every one of them
            passed the federated audit (``site_audit`` of ``release_cohort``).
    """

    min_mask_edits: int = 1
    informed_copy_rms: float = 0.02
    require_dp: bool = True
    max_linkage_rate: float = 0.5
    audit_every_site: bool = True


SiteAudit = Callable[[list[np.ndarray]], list[dict[str, Any]]]
"""Candidates (``[D, H, W]`` float32 in [-1, 1], release order) -> one verdict per site (``server/audit.py``)."""


def _failure(verdict: dict[str, Any]) -> str:
    if verdict.get("reason"):
        return str(verdict["reason"])
    return f"{verdict.get('copies', '?')} copied volume(s), {verdict.get('slice_copies', '?')} copied slice(s)"


def check_site_verdicts(
    verdicts: Sequence[dict[str, Any]] | None, trained_at: Sequence[str], policy: ReleasePolicy
) -> dict[str, Any]:
    """The report's ``federated_audit`` section; refuses unless every site that trained the model passed.

    Args:
        verdicts: the sites' verdicts, or ``None`` where no federated audit ran.
        trained_at: the sites whose private data trained the model (``model_statement``).
    """
    if verdicts is None:
        if len(trained_at) > 1 and policy.audit_every_site:
            raise ReleaseRefusedError(
                f"release: the model was trained at {len(trained_at)} sites ({', '.join(trained_at)}) and only "
                "this site's patients were audited; run the federated audit (--audit-sites DATA_ROOT) so "
                "that every site checks the candidates against its own patients"
            )
        return {"run": False, "why": "the model was trained at one site" if len(trained_at) <= 1 else "waived"}
    failed = [v for v in verdicts if not v.get("passed")]
    passed = {str(v["site"]) for v in verdicts if v.get("passed")}
    missing = [site for site in trained_at if site not in passed and site not in {str(v["site"]) for v in failed}]
    if failed or missing or not verdicts:
        what = [f"{v['site']} ({_failure(v)})" for v in failed]
        what += [f"{site} (no verdict)" for site in missing]
        raise ReleaseRefusedError(
            f"release: the federated audit failed at {len(what)} of {len(verdicts) + len(missing)} sites: "
            f"{', '.join(what) or 'no site answered'}; nothing was written"
        )
    return {
        "run": True,
        "rule": "every site audited the candidates against all its own patients; only verdicts left the sites",
        "sites": [dict(v) for v in verdicts],
        "passed": True,
    }


@dataclass(frozen=True)
class GeneratedCase:
    """One generated case, as the enhancement application produced it.

    Attributes:
        image: ``[X, Y, Z]`` intensities in the voxel order ``affine`` describes.
        label: ``[X, Y, Z]`` integer label ids.
        affine: ``[4, 4]`` voxel-to-world (RAS mm).
        provenance: must say the informed source, as ``{"informed": {"kind": ...}}`` or
            ``{"informed_source": ...}``, and the mask edits, as ``{"mask_edits": [{"name": ...,
            "changed": bool}, ...]}`` or ``{"mask_source": "generated"}``.
        informed_slice: ``[H, W]`` the informed slice on the model grid (in [-1, 1]), if known,
            for the pixel check.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    provenance: dict[str, Any]
    informed_slice: np.ndarray | None = None


@dataclass(frozen=True)
class PlannedCase:
    """What the gate checks of a case before it is sampled (``release_dataset``).

    Attributes:
        provenance: as ``GeneratedCase.provenance``.
        informed_slice: ``[H, W]`` its informed slice on the model grid, in [-1, 1].
    """

    provenance: dict[str, Any]
    informed_slice: np.ndarray | None


Checked = GeneratedCase | PlannedCase
"""A case as the policy checks see it: only its provenance and informed slice are read."""


def informed_kind(provenance: dict[str, Any]) -> str | None:
    """The declared informed-slice source of a provenance record (``None`` if it says nothing)."""
    informed = provenance.get("informed")
    if isinstance(informed, dict) and "kind" in informed:
        return str(informed["kind"])
    if "informed_source" in provenance:
        return str(provenance["informed_source"])
    return None


# Edits that leave the anatomy's shape as it was, up to an isometry or a renaming of labels: a
# mask edited only by them is its source patient's mask, as linkable as the original (a flipped
# mask matched its source with foreground Dice 0.987). They do not count towards the policy.
SHAPE_PRESERVING_EDITS = ("flip", "relabel", "remove")


def changes_anatomy(record: dict[str, Any]) -> bool:
    """Whether one mask-edit record (``gem3d.masks.apply_edits``) changed the anatomy's shape.

    No: an edit that changed nothing, a flip, a relabelling or removal of a label (the
    foreground keeps its outline), a rotation by a multiple of 90 degrees (an isometry of the grid).
    """
    if not record.get("changed", True):
        return False
    name = str(record.get("name", "?"))
    if name in SHAPE_PRESERVING_EDITS:
        return False
    if name == "rotate":
        angle = float(record.get("angle_deg", 1.0))
        return abs(angle / 90.0 - round(angle / 90.0)) > 1e-6
    return True


def effective_mask_edits(provenance: dict[str, Any]) -> list[str]:
    """Names of the mask edits that changed the anatomy (``changes_anatomy``); records without ``changed`` count."""
    edits = provenance.get("mask_edits") or []
    return [str(e.get("name", "?")) for e in edits if isinstance(e, dict) and changes_anatomy(e)]


def check_policy(cases: Sequence[Checked], policy: ReleasePolicy) -> None:
    """Refuse cases whose informed slice is not generated or whose mask is not edited enough.

    Cases are named by their position only: error messages must not carry source ids either.
    """
    if not cases:
        raise ReleasePolicyError("release: no generated cases to release")
    for index, case in enumerate(cases):
        kind = informed_kind(case.provenance)
        if kind != "generate":
            reason = (
                "carries a real patient's pixels into the synthetic volume"
                if kind in ("real", "copy", "file")
                else "is not recorded in the provenance"
            )
            raise ReleasePolicyError(
                f"generated case {index}: informed slice source {kind!r} {reason}; "
                "a privacy release allows only generated informed slices (--informed generate)"
            )
        if case.provenance.get("mask_source") == "generated":
            continue
        edits = effective_mask_edits(case.provenance)
        if len(edits) < policy.min_mask_edits:
            raise ReleasePolicyError(
                f"generated case {index}: its mask was changed by {len(edits)} edit(s) "
                f"({', '.join(edits) or 'none'}); the policy requires at least {policy.min_mask_edits}"
            )


def check_informed_pixels(cases: Sequence[Checked], real: Sequence[Volume], policy: ReleasePolicy) -> None:
    """Refuse any informed slice that (nearly) equals a real training slice, at any position, flipped or rotated.

    Every case must carry its informed slice (a release that cannot check one refuses it).

    Args:
        real: training volumes on the model grid, ``image`` ``[D, H, W]`` in [-1, 1].
    """
    for index, case in enumerate(cases):
        if case.informed_slice is None:
            raise ReleasePolicyError(
                f"generated case {index}: its informed slice did not reach the release gate, so its pixels "
                "cannot be checked against the real slices; refused"
            )
    slices = [np.asarray(c.informed_slice, dtype=np.float32) for c in cases]
    for index, rms in enumerate(nearest_slice_rms(slices, real)):
        if rms < policy.informed_copy_rms:
            raise ReleasePolicyError(
                f"generated case {index}: its informed slice matches a real training slice "
                f"(RMS difference {rms:.4f} < {policy.informed_copy_rms:g}, flips and 90-degree rotations "
                "included); copied informed slices are refused"
            )


PIXEL_CHUNK = 32
"""Informed slices ``nearest_slice_rms`` compares at once (8 variants each: 34 MB of float64 at 128^2)."""


def nearest_slice_rms(slices: Sequence[np.ndarray], real: Sequence[Volume]) -> np.ndarray:
    """Per ``[H, W]`` slice: the smallest RMS difference to any slice of any real volume, over its 8 dihedral variants.

    Squared distances come from one matrix product per real volume and chunk of slices,
    ``|a|^2 + |b|^2 - 2 a.b`` in float64 (about 1e-12 from the direct sum at [-1, 1] intensities),
    not from a ``[D, 8, H, W]`` difference per pair: at brats size and 200 x 200 cases that took
    about 20 minutes on 2 CPU cores. Each real volume is read once (``real`` may read it from disk).

    Args:
        real: volumes on the model grid, ``image`` ``[D, H, W]``.
    Returns:
        ``[len(slices)]`` RMS differences (``inf`` where ``real`` has no slice).
    Raises:
        DataError: a slice whose shape is not the real slices'.
    """
    best_sq = np.full(len(slices), np.inf)
    for number in range(len(real)):
        volume = torch.from_numpy(np.asarray(real[number].image, dtype=np.float32)).double()
        for index, image in enumerate(slices):
            if image.shape != volume.shape[1:]:
                raise DataError(
                    f"generated case {index}: informed slice shape {image.shape} differs from the "
                    f"training slices' {tuple(volume.shape[1:])}"
                )
        rows = volume.flatten(1)  # [D, H*W]
        rows_sq = rows.pow(2).sum(1)
        for first in range(0, len(slices), PIXEL_CHUNK):
            chunk = torch.from_numpy(np.stack(slices[first : first + PIXEL_CHUNK]))[:, None].double()
            variants = torch.cat(list(dihedral(chunk))).flatten(1)  # [8 x chunk, H*W], variant-major
            sq = rows_sq[:, None] + variants.pow(2).sum(1)[None] - 2 * rows @ variants.T  # [D, 8 x chunk]
            mean_sq = (sq.clamp_min(0) / rows.shape[1]).view(rows.shape[0], 8, len(chunk)).amin(dim=(0, 1))
            best_sq[first : first + len(chunk)] = np.minimum(best_sq[first : first + len(chunk)], mean_sq.numpy())
    return np.sqrt(best_sq)


def check_linkage(
    masks: Sequence[np.ndarray], sources: Sequence[int], train: Sequence[Volume], policy: ReleasePolicy
) -> dict[str, Any]:
    """Run the mask linkage attack (``privacy.linkage``) and refuse a release it links too well.

    Refused: a hit rate above ``policy.max_linkage_rate``, or any released mask closer to its
    source than the two closest different training patients are to each other.

    Args:
        masks: the released masks on the model grid ``[D, H, W]``; sources: each one's index in ``train``.
    Returns:
        the report's ``mask_linkage`` section (aggregates only).
    """
    result = linkage_test(masks, sources, LazySequence(len(train), lambda i: train[i].label))
    report = result.report()
    if result.too_close:
        raise ReleaseRefusedError(
            f"release: {result.too_close} of {result.released} edited masks are closer to their source patient "
            f"(foreground Dice) than any two training patients are to each other "
            f"({report['inter_patient_dice_max']:.3f}); use stronger --mask-edit edits"
        )
    if result.hit_rate > policy.max_linkage_rate:
        raise ReleaseRefusedError(
            f"release: the mask linkage attack found the source patient of {result.hits} of {result.released} "
            f"edited masks (hit rate {result.hit_rate:.2f} > the policy's {policy.max_linkage_rate:g}; chance "
            f"{result.chance:.2f}); use stronger --mask-edit edits (see experiments/benchmarks/mask_linkage.py)"
        )
    return report


def check_model_privacy(privacy_statement: dict[str, Any] | None, policy: ReleasePolicy) -> dict[str, Any]:
    """The report's ``differential_privacy`` section; refuses a model with a stage trained on private data without DP.

    Args:
        privacy_statement: ``privacy.model_privacy.model_statement`` of the model; ``None`` when
            the model has no privacy record at all.
    """
    if privacy_statement is None:
        privacy_statement = statement([("model", None)])
    patient = privacy_statement["patient_level"]
    non_dp = privacy_statement["non_dp_private"]
    if non_dp and policy.require_dp:
        more = f" (and {len(non_dp) - 1} more)" if len(non_dp) > 1 else ""
        raise ReleaseRefusedError(
            f"release: the model is not DP-SGD trained throughout: {non_dp[0]}{more}; train every stage on "
            "private data with privacy.enabled=true, or pass --allow-non-dp to release without a formal guarantee"
        )
    accountants = sorted({str(s.get("accountant")) for s in patient["sites"].values() if s.get("accountant")})
    return {
        "level": patient["level"] if patient["epsilon"] is not None else "none",
        "epsilon": patient["epsilon"],
        "delta": patient["delta"],
        "accountant": ",".join(accountants) or None,
        "sites": {name: {"epsilon": s["epsilon"], "delta": s["delta"]} for name, s in patient["sites"].items()},
        "client_level": privacy_statement["client_level"],
        "non_dp_private": non_dp,
        "public": privacy_statement["public"],
        "what_holds": _what_holds(patient, privacy_statement["client_level"], non_dp),
    }


def _what_holds(patient: dict[str, Any], client: dict[str, Any] | None, non_dp: list[str]) -> list[str]:
    """The privacy report's plain statements: what the figures guarantee, to whom, and what they do not."""
    lines = []
    if patient["epsilon"] is not None and not non_dp:
        lines.append(
            f"The model that generated these images is ({patient['epsilon']:.3g}, {patient['delta']:g})-"
            "differentially private for each patient of each site (DP-SGD, one patient = one volume; "
            "the maximum over sites, each site's ledger composing all its stages), against anyone who sees "
            "the model or its outputs, the federated coordinator included. The images are post-processing."
        )
    elif non_dp:
        lines.append(f"No formal guarantee: released with --allow-non-dp ({non_dp[0]}).")
    else:
        lines.append("The model trained on data declared public only: no patient-level guarantee is needed or given.")
    if client is not None:
        lines.append(
            f"Client-level ε = {float(client['epsilon']):.3g} at δ = {float(client['delta']):g} for a site's "
            "participation, against recipients of the model (not against the coordinator)."
        )
    lines.append(
        "The released labels are edited copies of real segmentations: differential privacy does not cover them."
    )
    return lines


INCOMPLETE = "INCOMPLETE-NOT-A-RELEASE"


def mark_incomplete(work: Path) -> None:
    """Mark a release's work folder ``INCOMPLETE-NOT-A-RELEASE`` until it is renamed to ``out``.

    The folder is ``gem3d.files.AtomicFolder``'s, beside ``out`` (never in the system temp dir):
    its name carries the owner's process id, so a folder whose process is gone (a killed release)
    is removed by the next run into the same parent folder. It only ever holds pseudonymous,
    scrubbed files: no source id, site or path.
    """
    (work / INCOMPLETE).write_text("a release in progress or killed: not audited, not a release\n")


def secret_order(count: int, seed: int | None = None) -> list[int]:
    """A random permutation of ``range(count)`` from the OS's CSPRNG (a seed only for tests)."""
    if seed is not None:
        return [int(i) for i in np.random.default_rng(seed).permutation(count)]
    order = list(range(count))
    secrets.SystemRandom().shuffle(order)
    return order


def pseudonymous_ids(count: int, seed: int | None = None, prefix: str = "gem3d_syn_") -> list[str]:
    """``count`` distinct random ids, unrelated to any source id or order.

    ``seed=None`` draws from the OS (the default for releases); a seed makes ids reproducible,
    so only use one that is not published next to the cohort.
    """
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(prefix + rng.bytes(6).hex())
    return sorted(ids)  # sorted random ids: the file order reveals nothing about the sources


def scrubbed_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with a fresh header: geometry only, free-text fields empty, no extensions."""
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    header = image.header
    for name in SCRUBBED_FIELDS:
        header[name] = b""
    header.extensions.clear()
    header.set_xyzt_units("mm", "sec")
    return image


def scrub_nifti(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """``image`` with its header replaced by a scrubbed one (same voxels, same affine)."""
    return scrubbed_image(np.asanyarray(image.dataobj), image.affine)


def _case_provenance(case: GeneratedCase, generator: dict[str, Any]) -> dict[str, Any]:
    """An allow-listed provenance record: no source case, site, path or date can slip through."""
    record: dict[str, Any] = {
        "informed_source": informed_kind(case.provenance),
        "mask_source": "generated" if case.provenance.get("mask_source") == "generated" else "edited",
        "mask_edits": effective_mask_edits(case.provenance),
    }
    if generator:
        record["generator"] = generator
    return record


def release_cohort(
    cases: Sequence[GeneratedCase],
    out: str | Path,
    *,
    train: Sequence[Volume],
    data_cfg: DataConfig,
    privacy_statement: dict[str, Any] | None,
    holdout: Sequence[Volume] | None = None,
    policy: ReleasePolicy = ReleasePolicy(),
    audit_settings: AuditSettings | None = None,
    generator: dict[str, Any] | None = None,
    seed: int | None = None,
    label_names: dict[int, str] | None = None,
    mask_linkage: dict[str, Any] | None = None,
    site_audit: SiteAudit | None = None,
) -> Path:
    """Check, write, audit and publish a synthetic cohort in nnU-Net v2 raw layout at ``out``.

    Args:
        train: the model's training volumes (``gem3d.data.dataset.load_volumes``) for the audit
            and the informed-pixel check.
        data_cfg: how the released files are read back for the audit (the model's data config).
        privacy_statement: the model's (``privacy.model_privacy.model_statement``); a model with a
            stage trained on private data without DP is refused unless ``policy.require_dp`` is off.
        holdout: real cases the model never saw; default: leave-one-out training distances.
        mask_linkage: the ``check_linkage`` report for these cases (``release_dataset`` always runs it).
        site_audit: the federated audit (``SiteAudit``): called with the written candidates after
            the local audit passed; required for a model trained at several sites.
        generator: non-identifying facts about the generator (checkpoint sha256, versions).
        seed: for reproducible pseudonymous ids (tests); default random.
    Returns:
        ``out``, holding ``imagesTr/``, ``labelsTr/``, ``provenance/``, ``dataset.json`` and
        ``privacy_report.json``.
    Raises:
        ReleasePolicyError, ReleaseRefusedError: nothing is written.
    """
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
    dp, trained_at = _refuse_early(cases, train, privacy_statement, policy, site_audit)
    order = secret_order(len(cases), seed)
    return _publish(
        (cases[index] for index in order),
        len(cases),
        out,
        train=train,
        data_cfg=data_cfg,
        dp=dp,
        trained_at=trained_at,
        holdout=holdout,
        policy=policy,
        audit_settings=audit_settings,
        generator=generator,
        seed=seed,
        label_names=label_names,
        mask_linkage=mask_linkage,
        site_audit=site_audit,
    )


def _refuse_early(
    cases: Sequence[Checked],
    train: Sequence[Volume],
    privacy_statement: dict[str, Any] | None,
    policy: ReleasePolicy,
    site_audit: SiteAudit | None,
) -> tuple[dict[str, Any], list[str]]:
    """Every check that needs no generated volume, before anything is written.

    Returns:
        the report's ``differential_privacy`` section and the sites that trained the model.
    """
    check_policy(cases, policy)
    check_informed_pixels(cases, train, policy)
    dp = check_model_privacy(privacy_statement, policy)
    trained_at = list((privacy_statement or {}).get("trained_at", []))
    if site_audit is None:
        check_site_verdicts(None, trained_at, policy)  # refuse before writing anything
    return dp, trained_at


def _publish(
    cases: Iterable[GeneratedCase],
    count: int,
    out: Path,
    *,
    train: Sequence[Volume],
    data_cfg: DataConfig,
    dp: dict[str, Any],
    trained_at: list[str],
    holdout: Sequence[Volume] | None,
    policy: ReleasePolicy,
    audit_settings: AuditSettings | None,
    generator: dict[str, Any] | None,
    seed: int | None,
    label_names: dict[int, str] | None,
    mask_linkage: dict[str, Any] | None,
    site_audit: SiteAudit | None,
) -> Path:
    """Write ``count`` checked cases into a work folder as they come, audit the files, then move the folder to ``out``.

    ``cases`` come in their secret order (``secret_order``): the k-th is written, as it arrives,
    under the k-th of the sorted pseudonyms, so neither a file's name, its place in the listing
    nor its write time follows the source. One case at a time is held here, and the audit reads
    the written candidates back a few at a time (``RawVolumes``): memory does not grow with the
    cohort (issue 16). A refusal or a kill leaves nothing at ``out``.
    """
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
    with AtomicFolder(out) as tmp:
        mark_incomplete(tmp)
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case_id, case in zip(pseudonymous_ids(count, seed), cases, strict=True):
            _write_case(tmp, case_id, case, generator or {})
        names = label_names or {}
        channel = "CT" if data_cfg.modality == "ct" else "MRI"
        labels = {i: names.get(i, "background" if i == 0 else f"label_{i}") for i in range(data_cfg.num_labels)}
        write_json(tmp / "dataset.json", dataset_json(channel, labels, count))
        candidates = RawVolumes(tmp, data_cfg)
        audit = memorization_audit(candidates, train, holdout, audit_settings or AuditSettings())
        if not audit.passed:
            raise ReleaseRefusedError(
                f"release: the memorization audit found {len(audit.copies)} of {count} generated volumes "
                "closer to a training volume than the copy threshold; nothing was written"
            )
        # the federated round sends every candidate in one message (server/audit.py): all of them at once
        verdicts = site_audit([v.image for v in candidates]) if site_audit is not None else None
        federated = check_site_verdicts(verdicts, trained_at, policy)
        write_json(
            tmp / "privacy_report.json",
            {
                "format": REPORT_FORMAT,
                "cases": count,
                "differential_privacy": dp,
                "audit": audit.report(include_ids=False),
                "mask_linkage": mask_linkage or {"attack": "not run"},
                "federated_audit": federated,
                "labels": "edited copies of real segmentations; differential privacy does not cover them",
                "policy": {
                    **asdict(policy),
                    "informed_source": "generate only",
                    "nifti_fields_scrubbed": list(SCRUBBED_FIELDS),
                    "case_ids": "random pseudonyms, unrelated to source ids or order",
                    "geometry": "one canonical grid for every case (RAS+, isotropic, centred; release config), "
                    "dataset-level intensities: no source affine, shape, crop box or intensity range",
                },
                "generator": generator or {},
            },
        )
        (tmp / INCOMPLETE).unlink()
    return out


def _write_case(folder: Path, case_id: str, case: GeneratedCase, generator: dict[str, Any]) -> None:
    """One released case: scrubbed NIfTI image (float32) and label (uint8) under its pseudonym, and its provenance.

    Not ``DatasetWriter``: a release's headers are scrubbed (``scrubbed_image``) and its labels uint8.
    """
    image_file, label_file = case_files(folder, case_id)
    image = scrubbed_image(np.asarray(case.image, dtype=np.float32), case.affine)
    atomic_write(image_file, lambda tmp: nib.save(image, tmp))
    label = scrubbed_image(np.asarray(case.label, dtype=np.uint8), case.affine)
    atomic_write(label_file, lambda tmp: nib.save(label, tmp))
    write_json(folder / "provenance" / f"{case_id}.json", _case_provenance(case, generator))


@dataclass(frozen=True)
class ReleaseResult:
    """What ``release_dataset`` published.

    Attributes:
        out: the released dataset folder.
        cases: the number of released cases.
        report: the contents of ``out/privacy_report.json``.
    """

    out: Path
    cases: int
    report: dict[str, Any]

    @property
    def report_path(self) -> Path:
        return self.out / "privacy_report.json"


def load_site_volumes(data: Path, cfg: Config) -> list[Volume]:
    """Every case of a dataset, or of each site dataset inside ``data``."""
    volumes: list[Volume] = []
    for _, folder in dataset_folders(data):
        volumes.extend(load_volumes(folder, cfg.data))
    return volumes


def generated_cases(jobs: Sequence[Job], volumes: Sequence[np.ndarray], cfg: Config) -> list[GeneratedCase]:
    """The sampled volumes of ``jobs`` on the release's canonical grid, each with its informed slice (model grid)."""
    return [generated_case(job, volume, cfg) for job, volume in zip(jobs, volumes, strict=True)]


def generated_case(job: Job, volume: np.ndarray, cfg: Config) -> GeneratedCase:
    """``job``'s sampled model-grid volume ``[D, H, W]`` on the release's canonical grid, with its informed slice."""
    assert job.target.label is not None
    image, label, affine = canonical_case(volume, job.target.label, job.target.geometry.label_values, cfg)
    return GeneratedCase(image, label, affine, job.provenance, job.informed.image)


def release_intensity(cfg: DataConfig) -> tuple[float, float]:
    """The dataset-level intensities [-1, 1] maps to in a release: the HU window for CT, [0, 1] for MRI.

    Never a patient's own range: a per-case scale (the source's percentiles) would follow its source.
    """
    return cfg.ct_window if cfg.modality == "ct" else (0.0, 1.0)


def canonical_case(
    image: np.ndarray, label: np.ndarray, label_values: Sequence[int], cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model-grid case on the release's canonical grid (``gem3d.config.ReleaseConfig``).

    Args:
        image: ``[D, H, W]`` in [-1, 1] on the model grid; label: ``[D, H, W]`` contiguous ids.
        label_values: the dataset's label value of each contiguous id.
    Returns:
        image ``[X, Y, Z]`` float32 on the dataset-level scale (``release_intensity``), label
        ``[X, Y, Z]`` int16 original values, and the canonical ``[4, 4]`` affine: RAS+,
        ``spacing_mm`` isotropic, centred on the origin. The same for every case of a release.
    """
    from monai.transforms import Resize

    from gem3d.data.geometry import model_axes

    size = cfg.data.image_size
    shape = (cfg.release.depth or size, size, size)
    low, high = release_intensity(cfg.data)
    grid = torch.from_numpy(np.clip(np.asarray(image, dtype=np.float32), -1.0, 1.0))[None]
    resized = np.asarray(Resize(shape, mode="trilinear", anti_aliasing=True, align_corners=False)(grid))[0]
    values = np.asarray(label_values, dtype=np.int16)[np.asarray(label, dtype=np.int64)]
    nearest = Resize(shape, mode="nearest-exact")(torch.from_numpy(values.astype(np.float32))[None])
    labels = np.asarray(nearest)[0].round().astype(np.int16)
    back = tuple(int(i) for i in np.argsort(model_axes(cfg.data.slice_axis)))  # model [D, H, W] -> RAS [X, Y, Z]
    out_image = np.transpose(low + (resized + 1.0) * 0.5 * (high - low), back).astype(np.float32)
    out_label = np.ascontiguousarray(np.transpose(labels, back))
    spacing = cfg.release.spacing_mm
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.asarray(out_image.shape, dtype=np.float64) - 1.0) / 2.0 * spacing
    return np.ascontiguousarray(out_image), out_label, affine


def release_dataset(
    synth: Synthesiser,
    data: Path,
    out: Path,
    *,
    per_case: int,
    mask_edit: str,
    policy: ReleasePolicy,
    privacy_statement: dict[str, Any] | None,
    holdout: Path | None = None,
    audit_settings: AuditSettings | None = None,
    seed: int = 0,
    on_progress: OnProgress | None = None,
    site_audit: SiteAudit | None = None,
) -> ReleaseResult:
    """Enhance ``data`` under the privacy policy and release the result at ``out`` (``gem3d release``).

    Order matters: the mask edits and the model's privacy are checked before any generation, so a
    refusal costs nothing; the audit runs on the written files inside ``release_cohort``.

    Args:
        synth: the run's models (``gem3d.synthesis.load_synthesiser``); informed slices are generated.
        data: the site's training data (nnU-Net v2 raw, or a folder of site datasets).
        per_case: new pairs per case.
        mask_edit: ``gem3d.masks`` edit spec applied to every mask (at least
            ``policy.min_mask_edits`` edits).
        privacy_statement: the model's privacy statement (``privacy.model_privacy.model_statement``).
        holdout: real cases the model never saw, the audit's reference.
        seed: seeds the generation.
        site_audit: the federated audit round (``SiteAudit``; ``experiments.simulation.simulate_audit_round``).
    Returns:
        the published folder, its case count and its privacy report.
    Raises:
        ConfigError: too few mask edits. ReleasePolicyError, ReleaseRefusedError: refused;
        nothing is written at ``out``.
    """
    edits = _shaping_edits(mask_edit, policy)
    # refuse before spending time on generation
    check_model_privacy(privacy_statement, policy)
    if site_audit is None:
        check_site_verdicts(None, list((privacy_statement or {}).get("trained_at", [])), policy)
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
    if holdout:
        dataset_folders(holdout)  # a bad --holdout is named before the training data is read
    # Planned with the informed slices in memory, so the gate checks their pixels; nothing
    # un-audited, and nothing carrying a source id, is ever written to the release's folder. The
    # site's cases and the edited masks wait in a private temporary spill (``gem3d.data.spill``),
    # read back a case or a batch at a time, so memory does not grow with the number of cases.
    with Spill.temporary() as spill:
        cases = read_grid_cases(data, synth.cfg, spill)
        train, holdout_volumes = _audit_references(cases, data, holdout, synth.cfg, audit_settings)
        jobs = enhancement_jobs(synth, cases, per_case, "generate", edits, seed, spill)
        linkage = _check_job_linkage(jobs, [case.case_id for case in cases], train, policy)
        # every check that needs no volume runs on the plan, before the first volume is sampled
        planned = [PlannedCase(job.provenance, job.informed.image) for job in jobs]
        dp, trained_at = _refuse_early(planned, train, privacy_statement, policy, site_audit)
        # Sampled in the secret order, a batch at a time, each case written as its batch ends: only
        # the release's pseudonymous, scrubbed files ever reach the disk, and memory holds one batch.
        ordered = reordered(jobs, secret_order(len(jobs)))
        published = _publish(
            (generated_case(job, volume, synth.cfg) for job, volume in iter_jobs(synth, ordered, on_progress)),
            len(jobs),
            out,
            train=train,
            data_cfg=synth.cfg.data,
            dp=dp,
            trained_at=trained_at,
            holdout=holdout_volumes,
            policy=policy,
            audit_settings=audit_settings,
            generator={"checkpoint_sha256": synth.checkpoints, "versions": library_versions()},
            seed=None,
            label_names=None,
            mask_linkage=linkage,
            site_audit=site_audit,
        )
    report = json.loads((published / "privacy_report.json").read_text())
    return ReleaseResult(out=published, cases=len(jobs), report=report)


def _shaping_edits(mask_edit: str, policy: ReleasePolicy) -> list[Any]:
    """The parsed ``--mask-edit`` spec; refused unless enough of its edits change the anatomy's shape.

    Raises:
        ConfigError: fewer than ``policy.min_mask_edits`` edits outside ``SHAPE_PRESERVING_EDITS``.
    """
    from gem3d.masks import parse_edits

    edits = parse_edits(mask_edit) if mask_edit else []
    shaping = [e for e in edits if e.name not in SHAPE_PRESERVING_EDITS]
    if len(shaping) < policy.min_mask_edits:
        raise ConfigError(
            f"--mask-edit {mask_edit!r}: {len(shaping)} edit(s) that change the anatomy's shape, the policy needs "
            f"at least {policy.min_mask_edits} ({', '.join(SHAPE_PRESERVING_EDITS)} keep it: they do not count)"
        )
    return edits


def _audit_references(
    cases: Sequence[SpilledCase], data: Path, holdout: Path | None, cfg: Config, audit_settings: AuditSettings | None
) -> tuple[Sequence[Volume], list[Volume] | None]:
    """The training volumes (the spilled ``cases``, read when indexed) and the holdout's (in memory).

    Both are checked to be enough for the audit's threshold, and disjoint, before any generation.
    """
    train = spilled_volumes(cases)
    warn_if_partial(train, cfg.data, data)
    holdout_volumes = load_site_volumes(holdout, cfg) if holdout else None
    if holdout_volumes is not None:
        check_holdout_disjoint(train, holdout_volumes, f"--holdout {holdout}")
    reference = (len(holdout_volumes), "holdout") if holdout_volumes is not None else (len(train), "leave-one-out")
    check_reference(audit_settings or AuditSettings(), *reference)
    return train, holdout_volumes


def _check_job_linkage(
    jobs: Sequence[Job], case_ids: Sequence[str], train: Sequence[Volume], policy: ReleasePolicy
) -> dict[str, Any]:
    """``check_linkage`` on the planned jobs' edited masks, each against its source in ``train`` (ids ``case_ids``)."""
    index = {case_id: i for i, case_id in enumerate(case_ids)}
    sources = [index[str(job.provenance["source_case"])] for job in jobs]
    return check_linkage(LazySequence(len(jobs), lambda i: _edited_mask(jobs[i])), sources, train, policy)


def _edited_mask(job: Job) -> np.ndarray:
    """A job's edited mask ``[D, H, W]`` (model grid)."""
    assert job.target.label is not None
    return job.target.label


__all__ = [
    "GeneratedCase",
    "PlannedCase",
    "ReleasePolicy",
    "ReleaseResult",
    "check_informed_pixels",
    "check_linkage",
    "check_model_privacy",
    "check_policy",
    "check_site_verdicts",
    "generated_case",
    "generated_cases",
    "load_site_volumes",
    "nearest_slice_rms",
    "pseudonymous_ids",
    "release_cohort",
    "release_dataset",
    "scrub_nifti",
    "scrubbed_image",
]
