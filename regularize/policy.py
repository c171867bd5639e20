"""Where dropout goes and how much: validated settings for one rewrite."""

from __future__ import annotations

import dataclasses
import math
import numbers

from regularize.errors import PolicyError


def validate_rate(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Returns `value` as a float in [0, 1), or raises `PolicyError`.

    Keras clamps `recurrent_dropout` into [0, 1] silently and accepts 1.0 for
    Dropout (which then zeroes everything), so rates are checked here.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PolicyError(
            f"Invalid `{name}`. Expected a float in [0, 1). Received: {name}={value!r}"
        )
    rate = float(value)
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise PolicyError(
            f"Invalid `{name}`. Expected a float in [0, 1). Received: {name}={value!r}"
        )
    return rate


@dataclasses.dataclass(frozen=True)
class Policy:
    """Settings of one rewrite.

    Attributes:
        rate: Dropout rate after activations and RNN input dropout.
        recurrent_rate: `recurrent_dropout` for RNN layers; None leaves it as
            it is (recurrent dropout disables the cuDNN kernel on GPU).
        skip_inference_only: Leave nested models that are always called with
            `training=False` alone: dropout inside them would never fire.
    """

    rate: float = 0.3
    recurrent_rate: float | None = None
    skip_inference_only: bool = True

    def __post_init__(self):
        object.__setattr__(self, "rate", validate_rate("rate", self.rate))
        object.__setattr__(
            self,
            "recurrent_rate",
            validate_rate("recurrent_rate", self.recurrent_rate, allow_none=True),
        )
