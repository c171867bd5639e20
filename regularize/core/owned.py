"""Layers that own their dropout: which config keys they are, and what a policy sets there.

A MultiHeadAttention layer, a keras-hub TransformerEncoder or a custom block
applies dropout inside its own `call`, from numbers in its config
(`dropout`, `dropout_rate`, `attention_dropout`, `hidden_dropout_prob`, ...).
Such a layer is regularized as RNN layers are: rebuilt from its edited config,
its weights copied over. The keys are found by name, not from a list of
classes, so any registered layer with such keys is covered.

Each key has a role, and the role picks the policy setting that drives it:
general dropout follows `rate`; dropout on attention probabilities follows
`attention_rate` (off by default: it disables fused attention kernels);
recurrent dropout follows `recurrent_rate`. No Keras import here.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
import re
from collections.abc import Mapping
from collections.abc import Sequence

# `dropout`, `dropout_rate`, `attention_dropout`, `hidden_dropout_prob`,
# `attention_probs_dropout_prob`, `resid_pdrop`, `attn_drop`, `proj_drop`.
# Stochastic depth (`drop_path_rate`, `drop_prob`) is not dropout of units.
_KEY = re.compile(r"^(?:[a-z0-9]+_)*?(?:dropout(?:_rate|_prob)?|pdrop|(?<=_)drop)$")
_ATTENTION = re.compile(r"(?:^|_)(?:attention|attn)(?:_|$)")
_RECURRENT = re.compile(r"(?:^|_)recurrent(?:_|$)")
# A model constructor's stochastic depth: `drop_path_rate`, `max_drop_path_rate`, `drop_path`.
_DROP_PATH = re.compile(r"^(?:[a-z0-9]+_)*?drop_path(?:_rate|_prob)?$")

ATTENTION_WARNING = (
    "attention dropout disables fused (flash) attention kernels on GPU: training "
    "and inference of the rebuilt attention layers run the slower explicit attention"
)


# Keras 3's MultiHeadAttention and GroupQueryAttention compute attention with
# the fused `ops.dot_product_attention` while their dropout is 0 and with
# explicit einsums above 0; the two round differently (5e-7 apart on a small
# layer), so a rebuild that crosses 0 cannot keep inference bit-exact.
KERNEL_SWITCH_SKIP = (
    "raising its dropout moves Keras' attention from the fused kernel to the explicit one, "
    "which rounds differently: set attention_rate to accept that"
)
KERNEL_SWITCH_WARNING = (
    "attention layers whose dropout crossed 0 now run Keras' other attention kernel (fused "
    "below, explicit above): inference differs by float rounding (about 1e-7), as an LSTM's "
    "does when recurrent_dropout changes its kernel"
)


def switches_kernel(kernel: str | None, old: Sequence[float], new: Sequence[float]) -> bool:
    """Whether new dropout values move an attention layer to its other kernel."""
    if kernel == "fused":
        return any(o == 0 and n > 0 for o, n in zip(old, new, strict=True))
    if kernel == "explicit":
        return any(o > 0 and n == 0 for o, n in zip(old, new, strict=True))
    return False


class Role(enum.StrEnum):
    """Which policy setting drives a key."""

    GENERAL = "rate"
    ATTENTION = "attention_rate"
    RECURRENT = "recurrent_rate"
    DROP_PATH = "drop_path"


@dataclasses.dataclass(frozen=True)
class Key:
    """One dropout setting in a layer's config.

    Attributes:
        name: The config key, e.g. "attention_dropout".
        value: Its value in the layer's config.
        role: The policy setting that drives it.
    """

    name: str
    value: float
    role: Role


def is_dropout_key(name: object) -> bool:
    """Whether a config key is named like a dropout rate."""
    return isinstance(name, str) and "drop_path" not in name and bool(_KEY.match(name))


def is_drop_path_key(name: object) -> bool:
    """Whether a config key is named like a stochastic-depth rate (`drop_path_rate`)."""
    return isinstance(name, str) and bool(_DROP_PATH.match(name))


def role_of(name: str, *, attention_layer: bool) -> Role:
    """The role of key `name`; the plain `dropout` of an attention layer is attention dropout.

    Keras' MultiHeadAttention, GroupedQueryAttention and Attention apply their
    `dropout` to the attention probabilities.
    """
    if _ATTENTION.search(name) or (attention_layer and name in ("dropout", "dropout_rate")):
        return Role.ATTENTION
    if _RECURRENT.search(name):
        return Role.RECURRENT
    return Role.GENERAL


def find_keys(config: object, *, attention_layer: bool = False) -> tuple[Key, ...]:
    """The dropout settings of a layer config (`layer.get_config()`), in config order.

    Only the layer's own top-level keys count, each a number in [0, 1]
    (bools and other types are not rates).
    """
    return _find(config, attention_layer=attention_layer, drop_path=False)


def find_arguments(config: object, *, nested: bool = True) -> tuple[Key, ...]:
    """The dropout-like arguments of a model constructor's config (a keras-hub `get_config()`).

    The keys of `find_keys`, and stochastic depth (`drop_path_rate`,
    `max_drop_path_rate`) with the role `DROP_PATH`: a model-level drop-path
    argument is the model's own setting, driven by the `drop_path` policy
    setting (a layer's is not: inside a graph, drop paths are inserted).

    A constructor argument that is itself a serialized Keras object (the
    `image_encoder` of a SegFormer or DepthAnything backbone, the sub-models
    of BLIP2) is the config that object is rebuilt from: with `nested`, its
    arguments count too, named by their path (`image_encoder.drop_path_rate`).
    """
    keys = list(_find(config, attention_layer=False, drop_path=True))
    if nested and isinstance(config, Mapping):
        for name, value in config.items():
            if _is_serialized(value):
                for key in find_arguments(value["config"]):
                    keys.append(dataclasses.replace(key, name=f"{name}.{key.name}"))
    return tuple(keys)


def with_arguments(config: Mapping, values: Mapping[str, float]) -> dict:
    """A copy of `config` with each argument of `values` (named as `find_arguments` does) set.

    The dicts on the path of a nested argument are copied, not changed.
    """
    new = dict(config)
    for name, value in values.items():
        head, _, rest = name.partition(".")
        if not rest:
            new[head] = value
            continue
        inner = dict(new[head])
        inner["config"] = with_arguments(inner["config"], {rest: value})
        new[head] = inner
    return new


def _is_serialized(value: object) -> bool:
    """Whether `value` is a serialized Keras object (`keras.saving.serialize_keras_object`)."""
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("class_name"), str)
        and isinstance(value.get("config"), Mapping)
    )


def _find(config: object, *, attention_layer: bool, drop_path: bool) -> tuple[Key, ...]:
    if not isinstance(config, Mapping):
        return ()
    keys = []
    for name, value in config.items():
        if is_dropout_key(name):
            role = role_of(name, attention_layer=attention_layer)
        elif drop_path and is_drop_path_key(name):
            role = Role.DROP_PATH
        else:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not 0.0 <= float(value) <= 1.0:
            continue
        keys.append(Key(name, float(value), role))
    return tuple(keys)


def new_values(keys: Sequence[Key], settings: Mapping[Role, float | None]) -> tuple[float, ...]:
    """The value each key gets from the setting of its role; None leaves a key as it is."""
    return tuple(k.value if settings[k.role] is None else settings[k.role] for k in keys)


def unset_reason(keys: Sequence[Key]) -> str:
    """Why nothing changes where no setting drives the keys (attention_rate off by default)."""
    roles = sorted({k.role.value for k in keys})
    return f"{' and '.join(roles)} not set: {describe(keys)} left as it is"


def describe(keys: Sequence[Key], values: Sequence[float] | None = None) -> str:
    """`dropout=0.1, attention_dropout=0`, or with new values `dropout 0.1 -> 0.3, ...`."""
    parts = []
    if values is None:
        values = [k.value for k in keys]
    for key, new in zip(keys, values, strict=True):
        if new == key.value:
            parts.append(f"{key.name}={new:g}")
        else:
            parts.append(f"{key.name} {key.value:g} -> {new:g}")
    return ", ".join(parts)


def describe_existing(keys: Sequence[Key]) -> str:
    """The `existing` column of the site: the settings above 0, or ""."""
    return ", ".join(f"{k.name}={k.value:g}" for k in keys if k.value)


def set_values(config: dict, keys: Sequence[Key], values: Sequence[float]) -> None:
    """Writes `values` into the layer config `config` (the `get_config()` dict)."""
    for key, value in zip(keys, values, strict=True):
        config[key.name] = value


def mismatches(config: object, keys: Sequence[Key], values: Sequence[float]) -> list[str]:
    """The keys a rebuilt layer's config does not carry at their new value.

    A layer whose `__init__` ignores or clamps an argument, or whose
    `get_config` reports a constant, would otherwise be "rebuilt" without
    the dropout the report claims.
    """
    if not isinstance(config, Mapping):
        return [k.name for k in keys]
    wrong = []
    for key, value in zip(keys, values, strict=True):
        got = config.get(key.name)
        if isinstance(got, bool) or not isinstance(got, numbers.Real) or float(got) != value:
            wrong.append(f"{key.name}={got!r} (expected {value:g})")
    return wrong


def check_rebuild(view, config: dict, keys: Sequence[Key], values: Sequence[float]) -> str | None:
    """Why the layer of `config` cannot be rebuilt with `values`, else None.

    Writes `values` into `config` (a `GraphView.config` result), then has
    `view` make a layer from it and compares that layer's own config.
    """
    set_values(view.layer_config(config), keys, values)
    try:
        rebuilt = view.probe(config)
    except Exception as err:  # any error of the layer's own __init__
        text = str(err).strip().splitlines()
        why = text[0][:160] if text else type(err).__name__
        return f"cannot be rebuilt with {describe(keys, values)} ({why})"
    wrong = mismatches(rebuilt, keys, values)
    if wrong:
        return f"rebuilt from its config, it does not carry the new value: {', '.join(wrong)}"
    return None
