"""What a walk changes, as records a builder applies (torch.fx-style typed results).

A site the walk keeps or skips needs nothing built: its `Site` record says
why. Each action names the *old* layer objects it concerns; the builder that
replays the graph makes the new layers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class NewDropout:
    """A new dropout layer after the output of `anchor`.

    Attributes:
        anchor: The layer the dropout follows; the new layer takes its dtype
            policy and `trainable` flag.
        kind: "Dropout", "SpatialDropout2D", "GaussianDropout", ...
        rate: The dropout rate.
        shape: The anchor's output shape.
        data_format: "channels_last" or "channels_first" near the anchor.
        mc: The layer stays active at inference (MC dropout).
        noise_shape: A `Dropout`'s noise shape, e.g. `(None, 1, 1, 1)` for a
            drop path (one draw per sample); None: the layer's default.
    """

    anchor: object
    kind: str
    rate: float
    shape: tuple
    data_format: str
    mc: bool = False
    noise_shape: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Insert(NewDropout):
    """A new dropout layer named `name`, `<anchor>__dropout` (made unique).

    One per anchor: the calls of a shared layer share it.
    """

    name: str


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Retarget(NewDropout):
    """The dropout layer `layer` after `anchor` is replaced by a new one.

    The new layer keeps the old one's name, so a later run still finds it.
    """

    layer: object


@dataclasses.dataclass(frozen=True, eq=False)
class Remove:
    """The dropout layer `layer` goes; its input passes through.

    Attributes:
        cast: The layer also casts its input (a mixed-precision dropout
            after a float32 tensor): an identity layer of the same dtype
            policy keeps that cast, so inference does not change.
    """

    layer: object
    cast: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Rebuild:
    """The layer `layer` is rebuilt from `config` (its dropout settings changed).

    An RNN layer (`values`: its dropout and recurrent_dropout), or a layer
    that applies dropout from its own config keys (`values`: one per key of
    `LayerFacts.owned`). Rebuilt, not patched in place: LSTMCell picks its
    kernel (implementation 1 or 2) in `__init__` from `recurrent_dropout`, and
    MultiHeadAttention and keras-hub blocks pass their rates to the sublayers
    they make there. The builder carries the weights over exactly.
    """

    layer: object
    config: dict
    values: tuple[float, ...]


Action = Insert | Retarget | Remove | Rebuild
