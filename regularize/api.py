"""The public verbs: add_dropout, remove_dropout, plan."""

from __future__ import annotations

import dataclasses
import os
import warnings

import keras

from regularize.core.errors import PolicyError
from regularize.core.errors import RegularizeWarning
from regularize.core.policy import Policy
from regularize.core.report import Report
from regularize.core.report import Site
from regularize.core.rules import validate_rate
from regularize.keras3 import hub
from regularize.keras3 import rewrite


def add_dropout(
    model: keras.Model | str | os.PathLike,
    rate: float = 0.3,
    *,
    recurrent_rate: float | None = None,
    drop_path: float | None = None,
    attention_rate: float | None = None,
    policy: Policy | str | os.PathLike | None = None,
    report: Report | None = None,
) -> keras.Model:
    """Returns a new model with dropout after activations and in RNN layers.

    Layers that apply dropout from their own config (MultiHeadAttention,
    keras-hub transformer blocks, any layer with `dropout`-like keys) are
    rebuilt with the new rates instead. The new model reuses the input model's
    layers and variables (no copy of the weights; rebuilt layers excepted), so
    inference with `training=False` is bit-identical. The input model is not
    changed.

    A keras-hub `Backbone` or `Task` keeps its class (and a task its
    preprocessor): its constructor's dropout arguments are set and the model
    is rebuilt with its weights copied (see `regularize.keras3.hub`).

    Args:
        model: A Functional or built Sequential model; or the path of a model
            file or a keras-hub preset folder (or handle), loaded with
            `regularize.load_model` and its checks (`safe_mode=True`, no
            custom objects: load it yourself for those).
        rate: Dropout rate, a float in [0, 1). 0 inserts nothing and removes
            dropout this tool inserted earlier.
        recurrent_rate: `recurrent_dropout` for LSTM/GRU/SimpleRNN/ConvLSTM
            layers; None leaves it unchanged.
        attention_rate: Dropout on attention probabilities (the `dropout` of
            MultiHeadAttention / GroupedQueryAttention, any `attention_dropout`
            key); None leaves it unchanged. It disables fused attention
            kernels on GPU.
        drop_path: Stochastic depth, a float in [0, 1): a per-sample
            `Dropout(noise_shape=(None, 1, ..., 1))` on the residual branch of
            every residual `Add`, the rate growing linearly with depth up to
            `drop_path` at the last merge. None (the default): off.
        policy: A `Policy`, or the path of a TOML policy file. A `Policy`
            overrides the rate arguments (`drop_path` fills in one that sets
            none); a file wins for the settings it states and the rate
            arguments fill in the rest.
        report: If given, receives one `Site` record per candidate.

    Returns:
        A new `keras.Model` (Sequential stays Sequential), compiled like the
        input if the input was compiled. For a path, the new model too, in
        memory; nothing is written. To write it, `regularize.save_model(new,
        "out.keras")`, or for a keras-hub model `new.save_to_preset("out")`
        (keras-hub's own). `regularize.process(path, "add", output=...)` does
        what the command line does: a preset folder in, a preset folder out,
        with the input's weights files copied as they are.

    Raises:
        PolicyError: A rate is not a float in [0, 1), or the policy (file)
            is invalid.
        UnsupportedModelError: The model is subclassed or not built.

    Example:
        >>> base = keras.applications.MobileNetV2(include_top=False, weights=None)
        >>> new = regularize.add_dropout(base, rate=0.2)
        >>> head = regularize.add_dropout(base, policy=regularize.Policy(preset="head"))
        >>> deep = regularize.add_dropout(base, rate=0.0, drop_path=0.1)
    """
    report = report if report is not None else Report()
    policy, new = _run(model, rate, recurrent_rate, drop_path, attention_rate, policy, report)
    if policy.asks_for_dropout() and report.with_dropout() == 0:
        warnings.warn(
            "The policy put dropout nowhere: the new model has the same graph as the "
            f"input ({len(report.sites)} candidate sites, none given dropout; see the "
            "report's `reason` of each site).",
            RegularizeWarning,
            stacklevel=2,
        )
    return new


def resolve_policy(
    policy: Policy | str | os.PathLike | None,
    *,
    rate: float | None = 0.3,
    recurrent_rate: float | None = None,
    drop_path: float | None = None,
    attention_rate: float | None = None,
) -> Policy:
    """A `Policy` from a `Policy`, a TOML file path, or None (rate settings).

    `drop_path` fills in a `Policy` that sets none (the argument is checked
    like any rate).
    """
    if isinstance(policy, Policy):
        validate_rate("drop_path", drop_path, allow_none=True)
        if drop_path is None or policy.drop_path is not None:
            return policy
        return dataclasses.replace(policy, drop_path=drop_path)
    rates = {"rate": rate, "recurrent_rate": recurrent_rate, "attention_rate": attention_rate}
    rates["drop_path"] = drop_path
    if policy is None:
        return Policy(**rates)
    if isinstance(policy, (str, os.PathLike)):
        return Policy.from_file(policy, **rates)
    raise PolicyError(
        "Invalid `policy`. Expected a `regularize.Policy` or the path of a TOML "
        f"policy file. Received: policy of type {type(policy).__name__!r}"
    )


def remove_dropout(
    model: keras.Model | str | os.PathLike, *, report: Report | None = None
) -> keras.Model:
    """Returns a new model without Dropout-family layers and with RNN dropout at 0.

    `model` may be a path, as for `add_dropout` (the new model is returned,
    nothing is written).

    Removes Dropout, SpatialDropout1D/2D/3D, GaussianDropout and AlphaDropout
    layers (a dropout layer that is itself a model output stays, to keep the
    output name), and zeroes `dropout` / `recurrent_dropout` of RNN layers and
    the dropout keys of layers that own their dropout (MultiHeadAttention,
    transformer blocks).
    """
    model = _loaded(model)
    return _engine(model).rewrite(model, Policy(rate=0.0), mode=rewrite.STRIP, report=report)


def _loaded(model: keras.Model | str | os.PathLike) -> keras.Model:
    """`model`, or the model at the path `model` (checked and loaded by `io.load_model`)."""
    if isinstance(model, (str, os.PathLike)):
        from regularize.keras3 import io

        return io.load_model(model)
    return model


def plan(
    model: keras.Model,
    rate: float = 0.3,
    *,
    recurrent_rate: float | None = None,
    drop_path: float | None = None,
    attention_rate: float | None = None,
    policy: Policy | str | os.PathLike | None = None,
    report: Report | None = None,
) -> list[Site]:
    """The sites `add_dropout` would touch or skip, without building anything.

    Takes the same arguments as `add_dropout`; `report` also receives the
    warnings (e.g. a rule that matches nothing). A keras-hub model whose
    constructor has dropout arguments is the exception: it is rebuilt once
    from its config, since only running it tells whether an argument keeps
    inference exact (see `regularize.keras3.hub`).
    """
    report = report if report is not None else Report()
    _run(model, rate, recurrent_rate, drop_path, attention_rate, policy, report, build=False)
    return report.sites


def _run(model, rate, recurrent_rate, drop_path, attention_rate, policy, report, *, build=True):
    """(the policy, the new model or None): `add_dropout` and `plan` (`build=False`) alike."""
    policy = resolve_policy(
        policy,
        rate=rate,
        recurrent_rate=recurrent_rate,
        attention_rate=attention_rate,
        drop_path=drop_path,
    )
    model = _loaded(model)
    return policy, _engine(model).rewrite(model, policy, build=build, report=report)


def _engine(model: keras.Model):
    """The module that rewrites `model`: `hub` for keras-hub models (their class stays)."""
    return hub if hub.is_hub_model(model) else rewrite
