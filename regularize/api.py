"""The public verbs: add_dropout, remove_dropout, plan."""

from __future__ import annotations

import keras

from regularize import rewrite
from regularize.policy import Policy
from regularize.report import Report
from regularize.report import Site


def add_dropout(
    model: keras.Model,
    rate: float = 0.3,
    *,
    recurrent_rate: float | None = None,
    policy: Policy | None = None,
    report: Report | None = None,
) -> keras.Model:
    """Returns a new model with dropout after activations and in RNN layers.

    The new model reuses the input model's layers and variables (no copy of
    the weights; rebuilt RNN layers excepted), so inference with
    `training=False` is bit-identical. The input model is not changed.

    Args:
        model: A Functional or built Sequential model.
        rate: Dropout rate, a float in [0, 1). 0 inserts nothing and removes
            dropout this tool inserted earlier.
        recurrent_rate: `recurrent_dropout` for LSTM/GRU/SimpleRNN/ConvLSTM
            layers; None leaves it unchanged.
        policy: Full settings; overrides `rate` and `recurrent_rate`.
        report: If given, receives one `Site` record per candidate.

    Returns:
        A new `keras.Model` (Sequential stays Sequential), compiled like the
        input if the input was compiled.

    Raises:
        PolicyError: A rate is not a float in [0, 1).
        UnsupportedModelError: The model is subclassed or not built.

    Example:
        >>> base = keras.applications.MobileNetV2(include_top=False, weights=None)
        >>> new = regularize.add_dropout(base, rate=0.2)
    """
    policy = policy or Policy(rate=rate, recurrent_rate=recurrent_rate)
    return rewrite.rewrite(model, policy, report=report)


def remove_dropout(model: keras.Model, *, report: Report | None = None) -> keras.Model:
    """Returns a new model without Dropout-family layers and with RNN dropout at 0.

    Removes Dropout, SpatialDropout1D/2D/3D, GaussianDropout and AlphaDropout
    layers (a dropout layer that is itself a model output stays, to keep the
    output name), and zeroes `dropout` / `recurrent_dropout` of RNN layers.
    """
    return rewrite.rewrite(model, Policy(rate=0.0), mode=rewrite.STRIP, report=report)


def plan(
    model: keras.Model,
    rate: float = 0.3,
    *,
    recurrent_rate: float | None = None,
    policy: Policy | None = None,
) -> list[Site]:
    """The sites `add_dropout` would touch or skip, without building anything."""
    policy = policy or Policy(rate=rate, recurrent_rate=recurrent_rate)
    report = Report()
    rewrite.rewrite(model, policy, build=False, report=report)
    return report.sites
