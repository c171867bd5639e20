"""A policy's vocabulary: the site facts (`Candidate`), a decision (`Decision`), a `Rule`.

An engine describes each site as a `Candidate` of plain facts; a `Rule` of the policy
matches it by name glob, class, depth and trainability; `Policy.decide`
(`regularize.core.policy`) turns it into a `Decision`. Pure Python.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers

from regularize.core.errors import PolicyError
from regularize.core.text import short_repr

PRESETS = ("all", "head", "blocks")
KINDS = ("auto", "dropout", "spatial", "gaussian", "alpha")
EXISTING = ("keep", "retarget", "remove")
RECURRENT = "recurrent"
# A layer that applies dropout inside, from its own config keys (core.owned).
OWNED = "owned"
KIND_CLASS = {"dropout": "Dropout", "gaussian": "GaussianDropout", "alpha": "AlphaDropout"}


def validate_rate(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Returns `value` as a float in [0, 1), or raises `PolicyError`.

    Keras clamps `recurrent_dropout` into [0, 1] silently and accepts 1.0 for
    Dropout (which then zeroes everything), so rates are checked here.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PolicyError(
            f"Invalid `{name}`. Expected a float in [0, 1). Received: {name}={short_repr(value)}"
        )
    rate = float(value)
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise PolicyError(
            f"Invalid `{name}`. Expected a float in [0, 1). Received: {name}={short_repr(value)}"
        )
    return rate


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Plain facts about one site, computed by the engine that walks the graph.

    Attributes:
        path: The anchor layer's path, nested models joined by "/".
        layer_class: Keras class name of the anchor layer.
        activation: Its non-linearity ("relu", "selu", ...); None for RNNs.
        depth: Position in the graph, 0 at the inputs, 1 at the outputs.
        trainable: The anchor layer's `trainable` flag.
        auto_kind: The dropout class the rank calls for ("Dropout",
            "SpatialDropout1D/2D/3D"), "recurrent" for an RNN layer, or
            "owned" for a layer with dropout settings of its own.
        in_head: No normalization layer lies between the site and any output
            (in a model without normalization: the output is at most rank 2).
        block_output: The site follows a residual `Add` or a `Concatenate`.
        gate: Why the site lies inside a gate (`regularize.core.gates`: a
            squeeze-excitation or sigmoid branch that scales another tensor),
            else None. Only a rule that names the layer (`match` or `class`)
            puts dropout there.
    """

    path: str
    layer_class: str
    activation: str | None
    depth: float
    trainable: bool
    auto_kind: str
    in_head: bool = False
    block_output: bool = False
    gate: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the policy wants at one site.

    Attributes:
        rate: Dropout rate (RNN input dropout); 0 means nothing goes there.
        kind: Keras class to insert ("Dropout", "SpatialDropout2D",
            "GaussianDropout", "AlphaDropout"), "recurrent" or "owned".
        reason: Why, in a few words.
        recurrent_rate: RNN `recurrent_dropout`; None leaves it unchanged.
        attention_rate: Dropout on attention probabilities; None leaves it
            unchanged.
        rule: Index of the last rule that matched, or None.
        skipped: The preset or a rule leaves the site out (rate is then 0).
    """

    rate: float
    kind: str
    reason: str
    recurrent_rate: float | None = None
    rule: int | None = None
    skipped: bool = False
    attention_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """One `[[rule]]`: which sites it matches and what it sets there.

    Unset fields (None) neither filter nor set anything. A matching rule
    that sets `rate` or `kind` without `skip = true` includes the site even
    where the preset leaves it out.
    """

    match: str | None = None
    layer_class: str | None = None
    depth: tuple[float, float] | None = None
    trainable: bool | None = None
    rate: float | None = None
    recurrent_rate: float | None = None
    attention_rate: float | None = None
    kind: str | None = None
    skip: bool | None = None

    def matches(self, c: Candidate) -> bool:
        if self.match is not None and not _glob(self.match, c.path):
            return False
        if self.layer_class is not None and self.layer_class != c.layer_class:
            return False
        if self.depth is not None and not self.depth[0] <= c.depth <= self.depth[1]:
            return False
        return self.trainable is None or self.trainable == c.trainable

    def describe(self, index: int) -> str:
        what = [
            f"{k}={short_repr(v, limit=40)}"
            for k, v in (("match", self.match), ("class", self.layer_class))
            if v is not None
        ]
        return f"rule {index + 1}" + (f" ({', '.join(what)})" if what else "")

    def to_dict(self) -> dict:
        data = {
            "match": self.match,
            "class": self.layer_class,
            "depth": list(self.depth) if self.depth else None,
            "trainable": self.trainable,
            "rate": self.rate,
            "recurrent_rate": self.recurrent_rate,
            "attention_rate": self.attention_rate,
            "kind": self.kind,
            "skip": self.skip,
        }
        return {k: v for k, v in data.items() if v is not None}


def _glob(pattern: str, path: str) -> bool:
    """A bare glob matches a layer at any depth; one with "/" the whole path."""
    if "/" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
