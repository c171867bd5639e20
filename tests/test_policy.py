"""Rates are validated here, not clamped silently by Keras."""

from __future__ import annotations

import keras
import pytest
from conftest import L
from conftest import mlp_sequential

import regularize
from regularize.errors import PolicyError
from regularize.errors import UnsupportedModelError


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.3", True, None, [0.1]])
def test_invalid_rate_is_refused(rate):
    case = mlp_sequential()
    with pytest.raises(PolicyError, match=r"Invalid `rate`. Expected a float in \[0, 1\)"):
        regularize.add_dropout(case.model, rate=rate)


@pytest.mark.parametrize("rate", [-1, 1.0, 2])
def test_invalid_recurrent_rate_is_refused(rate):
    case = mlp_sequential()
    with pytest.raises(PolicyError, match=r"Received: recurrent_rate="):
        regularize.add_dropout(case.model, 0.2, recurrent_rate=rate)


def test_policy_error_is_a_value_error():
    with pytest.raises(ValueError):
        regularize.Policy(rate=1.0)


def test_rate_zero_inserts_nothing():
    case = mlp_sequential()
    report = regularize.Report()
    new = regularize.add_dropout(case.model, 0.0, report=report)
    assert [layer.name for layer in new.layers] == [layer.name for layer in case.model.layers]
    assert {s.reason for s in report.sites} == {"rate is 0", "model output"}


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(keras.ops.ones((1, 3)))
    with pytest.raises(UnsupportedModelError, match="subclassed model 'Net'") as info:
        regularize.add_dropout(net)
    assert isinstance(info.value, TypeError)


def test_unbuilt_sequential_is_refused():
    model = keras.Sequential([L.Dense(2, activation="relu"), L.Dense(1)])
    with pytest.raises(UnsupportedModelError, match="not built"):
        regularize.add_dropout(model)


def test_not_a_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="Received: model of type 'Dense'"):
        regularize.add_dropout(L.Dense(3))
