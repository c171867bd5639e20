"""What a sweep compares: variants of one model, each a rate, a policy and extra settings.

TensorFlow-free, so that a bad rate, preset or policy file fails before the import.

A sweep over rates has one variant per rate (label "0.2"), rate 0 the baseline. A sweep over
policies has the baseline "none" (no dropout added) and one variant per policy entry and rate
(label "head@0.3"): an entry is a preset name ("all", "head", "blocks") or a TOML policy file,
optionally with its own rate after "@". Extra settings are further `Policy` keyword arguments
(e.g. a drop-path rate), so a new `Policy` key can be swept without changing this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from regularize.core.errors import PolicyError
from regularize.core.policy import Policy
from regularize.core.rules import PRESETS
from regularize.core.rules import validate_rate

DEFAULT_RATES = (0.0, 0.2, 0.3, 0.5)
SAME = "same"  # recurrent_rate follows the variant's rate
BASELINE = "none"  # the policy entry that adds no dropout


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant of the swept model.

    Attributes:
        label: Its name in tables, plots and file names ("0.2", "none", "head@0.3").
        rate: The dropout rate (0: no dropout from the policy).
        policy: The policy it starts from (a preset or a file), or None for `Policy()`'s
            defaults (preset "all").
        settings: Further `Policy` keyword arguments as (name, value) pairs, e.g.
            `(("drop_path", 0.1),)`; they win over the policy's own.
    """

    label: str
    rate: float
    policy: Policy | None = None
    settings: tuple[tuple[str, object], ...] = ()

    @property
    def is_baseline(self) -> bool:
        """No dropout added: rate 0 and no extra setting that adds any."""
        return self.rate == 0 and not any(value for _, value in self.settings)

    def policy_for(self, recurrent_rate: float | str | None = None) -> Policy:
        """The `Policy` that rewrites the model for this variant.

        Args:
            recurrent_rate: RNN `recurrent_dropout`: a float, "same" (this variant's
                rate), or None (the policy's own, unchanged by default).

        Raises:
            PolicyError: A setting is not a `Policy` key, or its value is invalid.
        """
        recurrent = self.rate if recurrent_rate == SAME else recurrent_rate
        changes: dict[str, object] = {"rate": self.rate}
        if recurrent_rate is not None or self.policy is None:
            changes["recurrent_rate"] = recurrent
        changes.update(self.settings)
        known = {field.name for field in dataclasses.fields(Policy)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise PolicyError(
                f"Invalid variant {self.label!r}: `Policy` has no setting "
                f"{', '.join(map(repr, unknown))}. Expected settings among "
                f"{', '.join(sorted(known - {'source'}))}. Received: {dict(self.settings)!r}"
            )
        if self.policy is None:
            return Policy(**changes)
        return dataclasses.replace(self.policy, **changes)

    def describe(self) -> dict:
        """JSON-able identity: what a resumed run must share with this one."""
        return {
            "label": self.label,
            "rate": self.rate,
            "policy": None if self.policy is None else self.policy.to_dict(),
            "settings": {name: value for name, value in self.settings},
        }


def format_rate(rate: float) -> str:
    """ "0", "0.2", "0.35": the shortest form, also used in file names."""
    return f"{rate:g}"


def parse_rates(text: str) -> tuple[float, ...]:
    """Rates from a comma-separated string such as "0,0.2,0.3,0.5".

    Raises:
        PolicyError: An entry is not a float in [0, 1), or appears twice.
    """
    items = [item.strip() for item in str(text).split(",")]
    rates = []
    for item in items:
        try:
            rates.append(float(item))
        except ValueError:
            raise PolicyError(
                "Invalid `rates`: every entry must be a float in [0, 1), comma-separated. "
                f"Received: rates={text!r}"
            ) from None
    return check_rates(rates, text=text)


def check_rates(rates: Sequence[float], *, text: str | None = None) -> tuple[float, ...]:
    """Validated rates, in ascending order.

    Raises:
        PolicyError: Empty, a rate outside [0, 1), or a rate given twice.
    """
    shown = text if text is not None else rates
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates:
        raise PolicyError(
            f"Invalid `rates`. Expected one or more floats in [0, 1). Received: rates={shown!r}"
        )
    checked = []
    for rate in rates:
        try:
            checked.append(validate_rate("rate", rate))
        except PolicyError:
            raise PolicyError(
                f"Invalid `rates`: {rate!r} is not a float in [0, 1). Received: rates={shown!r}"
            ) from None
    if len(set(checked)) != len(checked):
        raise PolicyError(
            f"Invalid `rates`: a rate is given twice. Expected distinct rates. "
            f"Received: rates={shown!r}"
        )
    return tuple(sorted(checked))


def rate_variants(
    rates: Sequence[float], policy: Policy | None = None
) -> tuple[list[Variant], list[str]]:
    """One variant per rate, ascending, rate 0 (the baseline) first; and notes.

    Raises:
        PolicyError: As `check_rates`.
    """
    notes = []
    rates = check_rates(list(rates))
    if 0.0 not in rates:
        rates = (0.0, *rates)
        notes.append("rate 0 (the baseline) added to the rates")
    return [Variant(format_rate(rate), rate, policy) for rate in rates], notes


def parse_policies(text: str) -> list[tuple[str, Policy | None, float | None]]:
    """Policy entries from "none,head,blocks@0.2,my_policy.toml".

    Returns:
        (name, policy, own rate or None) per entry; `none` gives (`none`, None, 0.0).

    Raises:
        PolicyError: An empty entry, an entry that is neither a preset nor a readable policy
            file, a bad rate after "@", or a name given twice.
    """
    entries = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            raise PolicyError(
                "Invalid `policies`: an entry is empty. Expected comma-separated preset names "
                f"({BASELINE}, {', '.join(PRESETS)}) or TOML policy files. Received: {text!r}"
            )
        name, _, rate_text = item.rpartition("@") if "@" in item else (item, "", "")
        rate = None
        if rate_text:
            try:
                rate = validate_rate("rate", float(rate_text))
            except (ValueError, PolicyError):
                raise PolicyError(
                    f"Invalid `policies`: the rate of {item!r} is not a float in [0, 1). "
                    f"Received: {text!r}"
                ) from None
        entries.append(policy_entry(name, rate))
    names = [name for name, _, _ in entries]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PolicyError(
            f"Invalid `policies`: {', '.join(twice)} given twice. Expected each preset or file "
            f"once (give rates with `rates`). Received: {text!r}"
        )
    return entries


def policy_entry(
    entry: str | os.PathLike | Policy, rate: float | None = None
) -> tuple[str, Policy | None, float | None]:
    """(name, policy, own rate) of one entry: "none", a preset, a file or a `Policy`."""
    if isinstance(entry, Policy):
        name = Path(entry.source).stem if entry.source else entry.preset
        return name, check_sweep_policy(entry), rate
    text = os.fspath(entry)
    if text == BASELINE:
        if rate:
            raise PolicyError(
                f"Invalid policy entry {text}@{rate:g}: `{BASELINE}` is the baseline, without "
                "dropout. Expected no rate after it."
            )
        return BASELINE, None, 0.0
    if text in PRESETS:
        return text, Policy(preset=text), rate
    path = Path(text)
    if path.suffix != ".toml":
        raise PolicyError(
            f"Invalid policy entry {text!r}: not a preset and not a `.toml` policy file. "
            f"Expected {BASELINE}, {', '.join(PRESETS)} or a TOML file."
        )
    policy = check_sweep_policy(Policy.from_file(path))
    return path.stem, policy, rate


def check_sweep_policy(policy: Policy) -> Policy:
    """`policy`, if a sweep can set its rate: no [schedule].

    Raises:
        PolicyError: The policy has a schedule.
    """
    if policy.schedule is not None:
        raise PolicyError(
            "Invalid `policy` for a sweep: its [schedule] sets the rate by depth, so the "
            "swept rate would be ignored. Expected a policy without a schedule."
            + (f" Received: {policy.source}" if policy.source else "")
        )
    return policy


def policy_variants(
    entries: Sequence[str | os.PathLike | Policy | tuple],
    rates: Sequence[float] | None = None,
) -> tuple[list[Variant], list[str]]:
    """The baseline `none`, then one variant per entry and rate; and notes.

    Args:
        entries: Preset names, TOML files, `Policy` objects, or the tuples of
            `parse_policies`. An entry's own rate ("head@0.2", or a file's `rate`) is used
            as is; the others are crossed with `rates` (0 left out: that is the baseline),
            or use `Policy`'s default rate when `rates` is None.
        rates: Rates to cross the entries without a rate of their own with.

    Raises:
        PolicyError: A bad entry or rate; two variants with one label.
    """
    notes = []
    parsed = [e if isinstance(e, tuple) else policy_entry(e) for e in entries]
    crossed = None
    if rates is not None:
        crossed = [r for r in check_rates(list(rates)) if r > 0] or None
    variants = [Variant(BASELINE, 0.0)]
    if all(name != BASELINE for name, _, _ in parsed):
        notes.append(f"the baseline ({BASELINE}: no dropout added) added to the policies")
    for name, policy, own in parsed:
        if name == BASELINE:
            continue
        if own is not None:
            chosen = [own]
        elif crossed is not None:
            chosen = crossed
        else:
            chosen = [Policy().rate if policy is None else policy.rate]
        variants += [Variant(f"{name}@{format_rate(r)}", r, policy) for r in chosen]
    return check_variants(variants), notes


def setting_variants(name: str, values: Sequence[float], base: Variant | None = None) -> list:
    """One variant per value of the `Policy` setting `name`, labelled e.g. "drop_path@0.1".

    Each is `base` (default: the baseline, no dropout from the rate) with `name=value`
    forwarded to `Policy(...)`; `Variant.policy_for` says if `Policy` has no such setting.
    """
    base = base or Variant(BASELINE, 0.0)
    return [
        dataclasses.replace(
            base,
            label=f"{name}@{format_rate(value)}",
            settings=(*base.settings, (name, value)),
        )
        for value in values
    ]


def check_variants(variants: Sequence[Variant], recurrent_rate=None) -> list[Variant]:
    """`variants` as a list, each label once, each policy valid, the baseline first.

    Raises:
        PolicyError: Two variants with one label, no baseline, or an invalid policy.
    """
    variants = list(variants)
    labels = [v.label for v in variants]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise PolicyError(
            f"Invalid variants: {', '.join(twice)} given twice. Expected distinct variants. "
            f"Received: {', '.join(labels)}"
        )
    for variant in variants:
        if "/" in variant.label or variant.label.startswith("."):
            raise PolicyError(
                f"Invalid variant label {variant.label!r}: it names files. Expected no '/' "
                "and no leading '.'."
            )
        variant.policy_for(recurrent_rate)
    baselines = [v for v in variants if v.is_baseline]
    if not baselines:
        raise PolicyError(
            "Invalid variants: none is the baseline (rate 0, no extra setting). Expected one "
            f"to compare the others with. Received: {', '.join(labels)}"
        )
    return [baselines[0]] + [v for v in variants if v is not baselines[0]]


def variants_from(
    rates: Sequence[float] | Sequence[Variant] | None, policy: Policy | None = None
) -> tuple[list[Variant], list[str]]:
    """Variants from what `run_sweep` was given: rates, or `Variant`s."""
    if rates is None:
        rates = DEFAULT_RATES
    if isinstance(rates, Sequence) and rates and all(isinstance(v, Variant) for v in rates):
        if policy is not None:
            raise PolicyError(
                "Invalid `policy` with a list of variants: each variant has its own. "
                "Expected `policy=None`."
            )
        return check_variants(rates), []
    return rate_variants(rates, policy)
