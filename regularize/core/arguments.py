"""Decisions on a model constructor's dropout arguments (`dropout`, `drop_path_rate`, ...).

What a dropout argument is has one definition (`owned.find_arguments`); this
decides each one's new value from the policy, Keras-free: the keras-hub
adapter (`keras3/hub.py`, `keras3/hub_edit.py`) rebuilds the model or edits
its preset's config with the result.
"""

from __future__ import annotations

from collections.abc import Mapping

from regularize.core import owned
from regularize.core.mode import Mode
from regularize.core.policy import Policy
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.report import Site


def decide(
    name: str, cls: str, config: Mapping, policy: Policy, mode: str, *, nested: bool = True
) -> tuple[dict, list[Site], list[str]]:
    """The new value of each dropout-like argument in `config`, one `Site` each, and warnings.

    Args:
        name: The model's path in the report (`task/backbone`).
        cls: Its class name.
        config: Its constructor's config (`get_config()`).
        policy: The settings: each argument follows its role's (`target`).
        mode: `Mode.ADD` or `Mode.STRIP`.
        nested: Count the arguments of serialized sub-model arguments too
            (`owned.find_arguments`); a task's `backbone` is decided on its own.

    Returns:
        (argument name -> new value, the sites, warning texts).
    """
    changes = {}
    sites = []
    notes = []
    for key in owned.find_arguments(config, nested=nested):
        old = key.value
        new, action, reason = target(key, policy, mode)
        existing = f"{key.name}={old:g}"
        if new is None:
            rate = old if reason == "already at the rate" else None
            sites.append(Site(name, cls, key.name, rate, action, reason, existing=existing))
            continue
        changes[key.name] = new
        reason = f"{key.name}: {old:g} -> {new:g} ({reason})"
        action = REMOVE if new == 0 else UPDATE
        sites.append(Site(name, cls, key.name, new, action, reason, existing=existing))
    if changes and policy.schedule is not None and mode == Mode.ADD:
        notes.append(f"{name}: a constructor argument has one rate, not a schedule: `rate` used")
    return changes, sites, notes


def target(key: owned.Key, policy: Policy, mode: str) -> tuple[float | None, str, str]:
    """(new value or None to leave it, action, reason) for one constructor argument.

    The setting of the key's role drives it (`rate`, `attention_rate`,
    `recurrent_rate`, `drop_path`). A value already above 0 is the model's
    own dropout: `existing` decides, and by default ("retarget" for a
    setting, see `Policy.setting_existing`) the rate asked for is set.
    """
    old = key.value
    if mode == Mode.STRIP:
        return (0.0, REMOVE, "removed") if old else (None, SKIP, "already 0")
    if policy.mc:
        return None, SKIP, "MC dropout cannot be set through a constructor argument"
    rate = getattr(policy, key.role.value)
    if rate is None:
        return None, SKIP, f"`{key.role.value}` not set: {key.name}={old:g} left as it is"
    existing = policy.setting_existing
    if old and existing == "keep":
        return None, KEEP, f"the model's own dropout ({key.name}={old:g}); existing='keep'"
    if old and existing == "remove":
        return 0.0, REMOVE, "existing='remove'"
    if old and not rate and policy.existing is None:
        # `rate=0` asks for no dropout from the tool (it removes the tool's own
        # layers), not for the model's: that takes existing='remove'.
        return None, KEEP, f"rate 0 leaves the model's own {key.name}={old:g}; existing='remove'"
    if rate == old:
        if not rate:
            return None, SKIP, f"`{key.role.value}` is 0: {key.name}=0 left as it is"
        return None, KEEP, "already at the rate"
    return float(rate), UPDATE, key.role.value
