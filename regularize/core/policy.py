"""Where dropout goes and how much: presets, rules, a depth schedule, TOML files.

Pure Python (no Keras import), so the Keras 2 engine's child process can use
the same decisions. The engine describes each site as a `Candidate` of plain
facts; `Policy.decide` turns it into a `Decision`.

A policy file (TOML):

    preset = "all"            # "all", "head" or "blocks"
    rate = 0.2
    recurrent_rate = 0.1      # RNN recurrent_dropout; absent: left as it is
    attention_rate = 0.1      # dropout on attention probabilities; absent: left as it is
    existing = "keep"         # dropout already in the model: keep, retarget, remove (absent:
                              # Dropout layers kept, dropout settings follow the rates)
    exact = false             # refuse changes that are not bit-identical at inference
    mc = false                # dropout stays active at inference (MC dropout)
    drop_path = 0.1           # stochastic depth before residual merges; absent: off

    [schedule]                # rate grows linearly with depth, before rules
    start = 0.1
    end = 0.4

    [[rule]]                  # rules apply in order; the last match wins
    match = "block5_*"        # name glob; "outer/inner/layer" paths for nested models
    class = "Conv2D"          # Keras class of the layer the dropout follows
    depth = [0.5, 1.0]        # fraction of the graph, inputs 0 .. outputs 1
    trainable = true
    rate = 0.4
    attention_rate = 0.1
    kind = "spatial"          # auto, dropout, spatial, gaussian, alpha
    skip = false
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable
from collections.abc import Mapping

from regularize.core.errors import PolicyError
from regularize.core.policy_file import check_choice
from regularize.core.policy_file import check_flag
from regularize.core.policy_file import check_no_unknown
from regularize.core.policy_file import check_rate
from regularize.core.policy_file import check_schedule
from regularize.core.policy_file import read_toml
from regularize.core.rules import EXISTING
from regularize.core.rules import KIND_CLASS
from regularize.core.rules import KINDS
from regularize.core.rules import OWNED
from regularize.core.rules import PRESETS
from regularize.core.rules import RECURRENT
from regularize.core.rules import Candidate
from regularize.core.rules import Decision
from regularize.core.rules import Rule
from regularize.core.text import short_repr

_POLICY_KEYS = (
    "preset",
    "rate",
    "recurrent_rate",
    "attention_rate",
    "schedule",
    "rule",
    "existing",
    "mc",
    "drop_path",
    "skip_inference_only",
    "exact",
)
_RULE_KEYS = (
    "match",
    "class",
    "depth",
    "trainable",
    "rate",
    "recurrent_rate",
    "attention_rate",
    "kind",
    "skip",
)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where and how much dropout; `add_dropout(model, policy=Policy(...))`.

    Attributes:
        rate: Dropout rate after activations and RNN input dropout.
        recurrent_rate: `recurrent_dropout` for RNN layers; None leaves it as
            it is (recurrent dropout disables the cuDNN kernel on GPU).
        attention_rate: Dropout on attention probabilities (the `dropout` of
            MultiHeadAttention / GroupedQueryAttention, any `attention_dropout`
            key); None leaves it as it is (it disables fused attention kernels
            on GPU).
        preset: "all" (every eligible activation), "head" (only after the
            last normalization layer, the classifier head of a pretrained
            CNN), or "blocks" (after the activation ending a residual or
            concatenation block).
        schedule: (start, end): the rate grows linearly with depth from start
            (inputs) to end (outputs) instead of `rate`; rules still apply.
        rules: `Rule`s applied in order; the last match wins.
        existing: Dropout the model already had (not inserted by this tool):
            "keep" it, "retarget" it like the tool's own, or "remove" it.
            None (the default): Dropout *layers* are kept, and dropout
            *settings* the model has (a keras-hub constructor's `dropout`,
            an attention or RNN layer's own rate) follow the rate asked for:
            a setting is not a layer the tool could add beside, so keeping
            it would make the request a no-op.
        mc: Insert dropout that stays active at inference (MC dropout).
        drop_path: Stochastic depth: a per-sample `Dropout` (noise shape
            `(None, 1, ..., 1)`) on the residual branch of every residual
            `Add`, its rate growing linearly from `drop_path / N` at the first
            of the N merges to `drop_path` at the last. None: off; 0 removes
            the drop paths this tool inserted earlier. Independent of
            `preset`, `rate` and the rules.
        exact: Refuse every change that does not keep inference
            bit-identical, including kernel switches that are otherwise
            accepted with a warning of the measured difference.
        skip_inference_only: Leave nested models that are always called with
            `training=False` alone: the caller asked for inference mode there.
        source: Where the policy came from, for messages.
    """

    rate: float = 0.3
    recurrent_rate: float | None = None
    attention_rate: float | None = None
    preset: str = "all"
    schedule: tuple[float, float] | None = None
    rules: tuple[Rule, ...] = ()
    existing: str | None = None
    mc: bool = False
    drop_path: float | None = None
    skip_inference_only: bool = True
    exact: bool = False
    source: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        where = f" in {self.source}" if self.source else ""
        _set = object.__setattr__
        _set(self, "rate", check_rate("rate", self.rate, where))
        _set(self, "recurrent_rate", check_rate("recurrent_rate", self.recurrent_rate, where, True))
        _set(self, "attention_rate", check_rate("attention_rate", self.attention_rate, where, True))
        _set(self, "preset", check_choice("preset", self.preset, PRESETS, where))
        if self.existing is not None:
            _set(self, "existing", check_choice("existing", self.existing, EXISTING, where))
        _set(self, "exact", check_flag("exact", self.exact, where))
        _set(self, "mc", check_flag("mc", self.mc, where))
        _set(self, "drop_path", check_rate("drop_path", self.drop_path, where, True))
        inference_only = check_flag("skip_inference_only", self.skip_inference_only, where)
        _set(self, "skip_inference_only", inference_only)
        if self.schedule is not None:
            _set(self, "schedule", check_schedule(self.schedule, where))
        rules = self.rules
        if isinstance(rules, Rule) or not isinstance(rules, (list, tuple)):
            raise PolicyError(
                f"Invalid `rules`{where}. Expected a list of rules. "
                f"Received: rules={short_repr(rules)}"
            )
        _set(self, "rules", tuple(_rule(r, i, where) for i, r in enumerate(rules)))

    # -- building ---------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "", **defaults) -> Policy:
        """A policy from a dict shaped like the TOML file.

        Keys the dict states win; `defaults` (e.g. the CLI's `--rate`) fill
        in the rest.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise PolicyError(
                f"Invalid policy{where}. Expected a table of settings. "
                f"Received: {type(data).__name__}"
            )
        check_no_unknown(data, _POLICY_KEYS, "policy key", where)
        values = {k: v for k, v in defaults.items() if v is not None}
        values.update({k: v for k, v in data.items() if k not in ("rule", "schedule")})
        if "schedule" in data:
            values["schedule"] = data["schedule"]
        if "rule" in data:
            values["rules"] = data["rule"]
        return cls(source=source, **values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **defaults) -> Policy:
        """Reads a TOML policy file; `defaults` fill in what it does not state."""
        return cls.from_dict(read_toml(path), source=str(path), **defaults)

    def to_dict(self) -> dict:
        """JSON-able settings; `Policy.from_dict(p.to_dict()) == p`."""
        data = {
            "preset": self.preset,
            "rate": self.rate,
            "mc": self.mc,
        }
        if self.existing is not None:
            data["existing"] = self.existing
        if self.exact:
            data["exact"] = True
        if self.drop_path is not None:
            data["drop_path"] = self.drop_path
        data["skip_inference_only"] = self.skip_inference_only
        if self.recurrent_rate is not None:
            data["recurrent_rate"] = self.recurrent_rate
        if self.attention_rate is not None:
            data["attention_rate"] = self.attention_rate
        if self.schedule is not None:
            data["schedule"] = {"start": self.schedule[0], "end": self.schedule[1]}
        if self.rules:
            data["rule"] = [r.to_dict() for r in self.rules]
        return data

    # -- deciding ---------------------------------------------------------

    @property
    def layer_existing(self) -> str:
        """What happens to a Dropout layer the model has: `existing`, "keep" by default."""
        return self.existing or "keep"

    @property
    def setting_existing(self) -> str:
        """What happens to a dropout setting the model has: `existing`, "retarget" by default."""
        return self.existing or "retarget"

    def decide(self, c: Candidate) -> Decision:
        """What goes at the site `c`: the preset, then the schedule, then the rules."""
        owns = c.auto_kind in (RECURRENT, OWNED)
        skip = self._preset_skip(c)
        rate = self._base_rate(c.depth)
        kind = "auto"
        rec_rate = self.recurrent_rate
        att_rate = self.attention_rate
        last = None
        named = False  # a rule that names this layer sets its dropout
        for i, rule in enumerate(self.rules):
            if not rule.matches(c):
                continue
            last = i
            if rule.skip or rule.rate is not None or rule.kind is not None:
                names = rule.match is not None or rule.layer_class is not None
                named = names and not rule.skip
            if rule.rate is not None:
                rate = rule.rate
            if rule.kind is not None:
                kind = rule.kind
            if rule.recurrent_rate is not None:
                rec_rate = rule.recurrent_rate
            if rule.attention_rate is not None:
                att_rate = rule.attention_rate
            if rule.skip is not None:
                skip = "skipped by " + rule.describe(i) if rule.skip else None
            elif rule.rate is not None or rule.kind is not None:
                skip = None
            elif rule.attention_rate is not None and c.auto_kind == OWNED:
                skip = None  # attention_rate sets nothing at another site
        by_rule = f", {self.rules[last].describe(last)}" if last is not None else ""
        if c.gate and not owns and not named and not skip:
            # A catch-all or depth rule is no reason to drop a gate's scale.
            skip = c.gate
        if skip:
            return Decision(0.0, c.auto_kind, skip, None, last, skipped=True)
        if owns:
            reason = f"{c.auto_kind}{by_rule}"
            return Decision(rate, c.auto_kind, reason, rec_rate, last, attention_rate=att_rate)
        cls = self._kind_class(kind, c)
        if rate == 0:
            return Decision(0.0, cls, f"rate is 0{by_rule}", None, last)
        anchor = c.activation or c.layer_class
        return Decision(rate, cls, f"after {anchor}{by_rule}", None, last)

    def asks_for_dropout(self) -> bool:
        """Whether the policy sets a rate above 0 anywhere.

        `rate=0` (removing the dropout this tool inserted) does not: a rewrite
        that then puts dropout nowhere is what was asked for.
        """
        rates = [self.rate, self.recurrent_rate, self.attention_rate, self.drop_path]
        rates += self.schedule or ()
        for rule in self.rules:
            rates += [rule.rate, rule.recurrent_rate, rule.attention_rate]
        return any(rate for rate in rates if rate is not None)

    def _preset_skip(self, c: Candidate) -> str | None:
        owns = c.auto_kind in (RECURRENT, OWNED)
        if c.activation is None and not owns and self.preset != "blocks":
            return f"preset {self.preset}: not after an activation"
        if self.preset == "head" and not c.in_head:
            return "preset head: before the last normalization layer"
        if self.preset == "blocks" and not c.block_output:
            return "preset blocks: not a block output"
        return None

    def _base_rate(self, depth: float) -> float:
        if self.schedule is None:
            return self.rate
        start, end = self.schedule
        return round(start + (end - start) * min(max(depth, 0.0), 1.0), 4)

    @staticmethod
    def _kind_class(kind: str, c: Candidate) -> str:
        if kind == "auto":
            # AlphaDropout keeps a SELU network's self-normalizing mean and variance.
            return "AlphaDropout" if c.activation == "selu" else c.auto_kind
        if kind == "spatial":
            return c.auto_kind  # Dropout where the tensor is not a feature map
        return KIND_CLASS[kind]

    def check_classes(self, is_known: Callable[[str], bool]) -> None:
        """Raises `PolicyError` for a rule `class` that `is_known` rejects."""
        for i, rule in enumerate(self.rules):
            if rule.layer_class is not None and not is_known(rule.layer_class):
                where = f" in {self.source}" if self.source else ""
                raise PolicyError(
                    f"Invalid `class` in rule {i + 1}{where}: no Keras layer class has that "
                    f"name. Expected a class name such as 'Conv2D' or 'ReLU'. "
                    f"Received: class={short_repr(rule.layer_class)}"
                )


def _rule(value, index: int, where: str) -> Rule:
    label = f"rule {index + 1}{where}"
    if isinstance(value, Rule):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise PolicyError(
            f"Invalid {label}. Expected a table of rule keys. Received: {short_repr(value)}"
        )
    check_no_unknown(value, _RULE_KEYS, "key", f" in {label}")
    out = {}
    for key in ("match", "class"):
        if key in value:
            if not isinstance(value[key], str) or not value[key]:
                raise PolicyError(
                    f"Invalid `{key}` in {label}. Expected a non-empty string. "
                    f"Received: {key}={short_repr(value[key])}"
                )
            out["layer_class" if key == "class" else key] = value[key]
    if "depth" in value:
        depth = value["depth"]
        ok = (
            isinstance(depth, (list, tuple))
            and len(depth) == 2
            and all(isinstance(d, numbers.Real) and not isinstance(d, bool) for d in depth)
            and 0 <= depth[0] <= depth[1] <= 1
        )
        if not ok:
            raise PolicyError(
                f"Invalid `depth` in {label}. Expected [low, high] with "
                f"0 <= low <= high <= 1. Received: depth={short_repr(depth)}"
            )
        out["depth"] = (float(depth[0]), float(depth[1]))
    for key in ("trainable", "skip"):
        if key in value:
            out[key] = check_flag(key, value[key], f" in {label}")
    for key in ("rate", "recurrent_rate", "attention_rate"):
        if key in value:
            out[key] = check_rate(key, value[key], f" in {label}")
    if "kind" in value:
        out["kind"] = check_choice("kind", value["kind"], KINDS, f" in {label}")
    return Rule(**out)
