"""A site's own privacy policy, and the check that a request is at least as strict.

In a federation the gem3d config, its ``[privacy]`` section included, comes from the server. A
site must not let the coordinator decide how private its patients are, so each site keeps its
own policy, a ``[privacy]`` table in the fields of ``gem3d.config.PrivacyConfig``::

    # <site state>/privacy_policy.toml (or the file named by node config 'privacy-policy')
    [privacy]
    enabled = true            # DP-SGD required for every training on this site's data
    noise_multiplier = 1.0    # the least noise accepted (or: target_epsilon, the most ε per stage)
    delta = 1e-5              # the largest δ accepted; the ledger's δ
    max_grad_norm = 1.0       # the largest clipping bound accepted
    budget_epsilon = 8.0      # the site's total budget; the ledger's budget, fixed at its creation

``enforce_policy`` compares the server's request with it: DP off where the policy requires it,
less noise, a larger δ, clipping bound or budget are refused with one line naming the field; a
request that is as strict or stricter is run as requested. A site with no policy refuses every
DP request rather than guessing what its patients were promised.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gem3d.config import PrivacyConfig, config_from_dict
from gem3d.errors import ConfigError
from privacy.errors import PolicyRefusedError
from privacy.site_state import SiteState


def load_policy(state: SiteState, node_config: dict[str, Any] | None = None) -> PrivacyConfig | None:
    """The site's policy: the file named by node config ``privacy-policy``, else the state folder's, else None.

    Raises:
        ConfigError: the named file is missing, or a policy file is not a valid ``[privacy]`` table.
    """
    named = (node_config or {}).get("privacy-policy")
    path = Path(str(named)).expanduser() if named else state.policy_path
    if not path.exists():
        if named:
            raise ConfigError(f"node config 'privacy-policy': {path} does not exist")
        return None
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a readable privacy policy ({error})") from None
    if set(raw) != {"privacy"}:
        raise ConfigError(f"{path}: a privacy policy holds exactly one [privacy] table")
    return config_from_dict({"privacy": raw["privacy"]}, str(path)).privacy


def enforce_policy(
    policy: PrivacyConfig | None,
    request: PrivacyConfig,
    *,
    batch_size: int,
    num_cases: int,
    planned_steps: int,
    site: str,
) -> PrivacyConfig:
    """The privacy a site trains under: ``request`` if it is at least as strict as ``policy``.

    Args:
        batch_size, num_cases: the request's expected batch and the site's patients, which set
            the Poisson rate a noise multiplier is resolved at.
        planned_steps: the steps a ``target_epsilon`` is spread over, for request and policy alike.
        site: names the site in messages.
    Raises:
        PolicyRefusedError: the request asks for less privacy than the policy, or for DP at a
            site that has no policy.
    """
    if policy is None:
        if request.enabled:
            raise PolicyRefusedError(
                f"{site}: refuses DP-SGD training: this site has no privacy policy (write "
                "privacy_policy.toml in its state folder, or set node config 'privacy-policy'), "
                "so it will not take the server's word for its patients' privacy"
            )
        return request
    if not policy.enabled:  # DP is not required here: any request, DP or not, is at least as strict
        return request
    if not request.enabled:
        raise PolicyRefusedError(
            f"{site}: refuses training without DP-SGD (privacy.enabled=false); its policy requires DP-SGD"
        )
    refusals = []
    if request.delta > policy.delta:
        refusals.append(f"privacy.delta={request.delta:g} > the policy's {policy.delta:g}")
    if request.max_grad_norm > policy.max_grad_norm:
        refusals.append(f"privacy.max_grad_norm={request.max_grad_norm:g} > the policy's {policy.max_grad_norm:g}")
    if request.budget_epsilon > policy.budget_epsilon:
        refusals.append(f"privacy.budget_epsilon={request.budget_epsilon:g} > the policy's {policy.budget_epsilon:g}")
    # Opacus is imported only here: a non-DP site without a policy never pays for it.
    from privacy.dp_sgd import resolve_noise_multiplier, sample_rate

    rate = sample_rate(batch_size, max(num_cases, 1))
    asked = resolve_noise_multiplier(request, rate, planned_steps)
    least = resolve_noise_multiplier(policy, rate, planned_steps)
    if asked < least:
        refusals.append(f"noise multiplier {asked:.4g} < the policy's least {least:.4g}")
    if refusals:
        raise PolicyRefusedError(f"{site}: refuses a request weaker than its privacy policy: {'; '.join(refusals)}")
    return request
