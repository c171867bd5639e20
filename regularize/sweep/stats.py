"""Numbers over seeds: mean ± std per variant, and paired differences with a 95 % interval.

Every variant of a sweep is trained once per seed from the same weights and batch order, so
a variant and the baseline of the same seed form a pair: the paired difference removes what
the seed does to both. The interval is the paired t interval over seeds, with the t quantile
from a table (no SciPy needed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Two-sided 95 %: the 0.975 quantile of Student's t for 1 .. 30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (4 decimals).

    Beyond 30 degrees of freedom, the Cornish-Fisher expansion around the normal quantile
    (error below 1e-5 there).
    """
    if df < 1:
        raise ValueError(f"Invalid `df`. Expected an int >= 1. Received: df={df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A variant minus the baseline, seed by seed, and the 95 % paired t interval.

    Attributes:
        differences: One per seed, in the order of the seeds.
        mean: Their mean.
        low: Lower end of the 95 % interval (None for a single seed).
        high: Upper end (None for a single seed).
    """

    differences: tuple[float, ...]
    mean: float
    low: float | None
    high: float | None

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval leaves 0 out; None without an interval."""
        if self.low is None or self.high is None:
            return None
        return not self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return {
            "differences": list(self.differences),
            "mean": self.mean,
            "ci95": None if self.low is None else [self.low, self.high],
            "distinguishable": self.distinguishable,
        }


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """`values - baseline` per seed, with the 95 % paired t interval of its mean."""
    if len(values) != len(baseline) or not values:
        raise ValueError(
            "Invalid pairs. Expected as many values as baseline values, at least one. "
            f"Received: {len(values)} and {len(baseline)}"
        )
    diffs = tuple(float(a) - float(b) for a, b in zip(values, baseline, strict=True))
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return PairedDifference(diffs, mean, None, None)
    half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDifference(diffs, mean, mean - half, mean + half)
