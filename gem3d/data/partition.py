"""Split a prepared dataset into K simulated sites for federated simulation.

Schemes:

* ``iid``: a seeded shuffle dealt round-robin, so sites differ only by chance.
* ``field``: non-IID by a manifest field. Cases are sorted by the field (a per-case stat such as
  ``spacing_z``, ``intensity_high``, ``foreground_fraction``, or the case id) and cut into K
  contiguous blocks, so each site holds a different range of that field, as hospitals with
  different scanners or populations do.
* ``dirichlet``: non-IID label-skew in the style of Hsu et al. (2019): cases are binned into classes
  (quantiles of ``field``, ``foreground_fraction`` by default), and each class is divided among the
  K sites with proportions drawn from Dirichlet(alpha); small alpha gives strongly skewed sites.

Every site gets at least one case. The result is a list of case-id lists, one per site, which
``gem3d.data.dataset.load_volumes(path, cfg, case_ids=...)`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from gem3d.data.prepare import read_manifest
from gem3d.errors import DataError

Scheme = Literal["iid", "field", "dirichlet"]
SCHEMES: tuple[Scheme, ...] = ("iid", "field", "dirichlet")


def case_field(case: dict[str, Any], name: str) -> Any:
    """A manifest case's value for ``name``: ``id``, a ``stats`` entry, or a top-level key."""
    if name == "id":
        return case["id"]
    if name in case.get("stats", {}):
        return case["stats"][name]
    if name in case:
        return case[name]
    raise DataError(f"manifest: case '{case['id']}' has no field '{name}' (stats: {sorted(case.get('stats', {}))})")


def _quantile_classes(values: list[Any], bins: int) -> np.ndarray:
    """Class ids 0..bins-1 by rank, so ties and non-numeric fields still split evenly."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    classes = np.empty(len(values), dtype=np.int64)
    for rank, index in enumerate(order):
        classes[index] = rank * bins // len(values)
    return classes


def _ensure_nonempty(sites: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """Move cases from the largest sites into empty ones, so every site can train."""
    for site in sites:
        if not site:
            donor = max(sites, key=len)
            site.append(donor.pop(int(rng.integers(len(donor)))))
    return sites


def partition_cases(
    cases: list[dict[str, Any]],
    num_sites: int,
    scheme: Scheme = "iid",
    field: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[str]]:
    """Assign cases to ``num_sites`` sites.

    Args:
        cases: manifest case records (``{"id", "stats", ...}``).
        field: the manifest field for ``field`` (required) and ``dirichlet`` (default ``foreground_fraction``).
        alpha: Dirichlet concentration; smaller is more skewed.
    Returns:
        ``num_sites`` lists of case ids, each non-empty and sorted; together they hold every case once.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme '{scheme}' (expected one of {', '.join(SCHEMES)})")
    if num_sites < 1:
        raise DataError(f"number of sites must be at least 1, got {num_sites}")
    if len(cases) < num_sites:
        raise DataError(f"cannot split {len(cases)} cases into {num_sites} sites (each site needs a case)")
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(cases)
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    if scheme == "iid":
        for rank, index in enumerate(rng.permutation(n)):
            sites[rank % num_sites].append(int(index))
    elif scheme == "field":
        if field is None:
            raise DataError("partition scheme 'field' needs a field name")
        values = [case_field(c, field) for c in cases]
        for index, site in enumerate(_quantile_classes(values, num_sites)):
            sites[int(site)].append(index)
    else:
        values = [case_field(c, field or "foreground_fraction") for c in cases]
        classes = _quantile_classes(values, max(1, min(num_sites, n // num_sites)))
        for label in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == label))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                sites[site].extend(int(i) for i in chunk)
    sites = _ensure_nonempty(sites, rng)
    return [sorted(cases[i]["id"] for i in site) for site in sites]


def partition_prepared(
    path: str | Path,
    num_sites: int,
    scheme: Scheme = "iid",
    field: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[str]]:
    """``partition_cases`` over the manifest of a prepared cache folder."""
    return partition_cases(read_manifest(path)["cases"], num_sites, scheme, field, alpha, seed)
