"""A plan says what the rewrite does: `plan()` and `add_dropout()` report the same sites.

Both are one walk of the decision core (`regularize.core.walk`), with and
without a builder. Before the core, the Keras 3 engine recorded the fate of
a re-targeted dropout layer only while building, so a plan differed from the
rewrite in the two cases below.
"""

from __future__ import annotations

import keras
from keras import layers as L

import regularize


def _sites(model, policy):
    planned, built = regularize.Report(), regularize.Report()
    regularize.plan(model, policy=policy, report=planned)
    regularize.add_dropout(model, policy=policy, report=built)
    return planned.sites, built.sites


def test_a_shared_dropout_is_retargeted_once_in_the_plan_too():
    inp = keras.Input((4,))
    a = L.Dense(4, activation="relu", name="a")(inp)
    b = L.Dense(4, activation="relu", name="b")(inp)
    shared = L.Dropout(0.1, name="shared_drop")
    out = L.Dense(1, name="out")(L.Add()([shared(a), shared(b)]))
    planned, built = _sites(keras.Model(inp, out), regularize.Policy(rate=0.4, existing="retarget"))
    assert planned == built
    assert [s.reason for s in planned] == [
        "Dropout(0.1) -> Dropout(0.4)",
        "shared, same as its first call",
    ]


def test_existing_remove_does_not_also_remove_a_retargeted_own_dropout_in_the_plan():
    inp = keras.Input((4,))
    out = L.Dense(1, name="out")(L.Dense(4, activation="relu", name="a")(inp))
    first = regularize.add_dropout(keras.Model(inp, out), 0.2)
    planned, built = _sites(first, regularize.Policy(rate=0.4, existing="remove"))
    assert planned == built
    assert [(s.layer, s.action) for s in planned] == [("a", "update")]
