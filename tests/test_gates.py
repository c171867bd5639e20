"""Gates and scaled residual merges: where dropout does not go, and where drop path does.

A squeeze-excitation gate (pooling -> bottleneck -> sigmoid -> Multiply) or a
GLU-style sigmoid gate scales another tensor: no dropout inside it by
default, a rule that names the layer still puts one there. Inception-ResNet's
`CustomScaleLayer` (`x + scale * branch`) and an `Add` after a constant scale
are residual merges for drop path, the scaled input being the branch. Tiny
Keras 3 models get the three-part check (structure, bit-exact inference,
save -> reload with plain Keras); the Keras 2 engine's is a slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import assert_same_model_except_dropout
from helpers import inserted
from helpers import predict
from helpers import snapshot

import regularize
from regularize.core import gates
from regularize.core.policy import Policy
from regularize.core.report import INSERT
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import Report
from regularize.core.rules import Rule

L = keras.layers
SE = gates.SQUEEZE_EXCITATION


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *shape)).astype("float32")


def se_block(hard: bool = False) -> keras.Model:
    """conv -> SE gate (GAP, reduce, expand, sigmoid or ReLU6 hard sigmoid) -> Multiply -> head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = L.Conv2D(2, 1, activation="relu", name="reduce")(s)
    if hard:  # MobileNetV3's hard sigmoid: ReLU(6)(x + 3) * (1 / 6)
        s = L.Conv2D(8, 1, name="expand")(s)
        s = L.ReLU(6.0, name="gate_relu6")(s + 3.0) * (1.0 / 6.0)
    else:
        s = L.Conv2D(8, 1, activation="sigmoid", name="expand")(s)
    x = L.Multiply(name="excite")([x, s])
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="after")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="se")


def glu_block() -> keras.Model:
    """A GLU-style gate: value * sigmoid(dense(x)), the same shape on both sides."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = L.Dense(8, activation="relu", name="embed")(inputs)
    value = L.Dense(8, activation="tanh", name="value")(x)
    gate = L.Dense(8, activation="sigmoid", name="gate")(x)
    x = L.Multiply(name="glu")([value, gate])
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="glu")


def _by_layer(report: Report) -> dict:
    return {s.layer: (s.action, s.reason) for s in report.sites if s.kind != "DropPath"}


def _check_rewrite(model, new, x, expected, before, tmp_path):
    assert_same_model_except_dropout(model, new, before)
    for left, right in zip(expected, predict(new, x), strict=True):
        np.testing.assert_array_equal(left, right)
    path = tmp_path / "model.keras"
    regularize.save_model(new, path)
    loaded = keras.models.load_model(path)
    assert inserted(loaded) == inserted(new)
    for left, right in zip(expected, predict(loaded, x), strict=True):
        np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("hard", [False, True], ids=["sigmoid", "hard_sigmoid"])
def test_no_dropout_inside_a_squeeze_excitation_gate(hard, tmp_path):
    model = se_block(hard)
    x = _x((8, 8, 3))
    expected, before = predict(model, x), snapshot(model)
    report = Report()
    new = regularize.add_dropout(model, 0.2, report=report)
    sites = _by_layer(report)
    gate = ["reduce", "gate_relu6"] if hard else ["reduce", "expand"]
    for name in gate:
        assert sites[name] == (SKIP, SE)
    assert sites["conv"][0] == INSERT  # the feature map the gate scales
    assert sites["after"][0] == INSERT
    assert set(inserted(new)) == {"conv__dropout", "after__dropout"}
    _check_rewrite(model, new, x, expected, before, tmp_path)


def test_no_dropout_inside_a_glu_gate(tmp_path):
    model = glu_block()
    x = _x((6,))
    expected, before = predict(model, x), snapshot(model)
    report = Report()
    new = regularize.add_dropout(model, 0.2, report=report)
    sites = _by_layer(report)
    assert sites["gate"] == (SKIP, gates.GATE)
    assert sites["value"][0] == INSERT  # the value the gate scales is no gate
    assert sites["embed"][0] == INSERT
    assert set(inserted(new)) == {"embed__dropout", "value__dropout"}
    _check_rewrite(model, new, x, expected, before, tmp_path)


def test_a_rule_that_names_a_gate_layer_puts_dropout_there(tmp_path):
    model = se_block()
    x = _x((8, 8, 3))
    expected, before = predict(model, x), snapshot(model)
    policy = Policy(rate=0.2, rules=[Rule(match="expand", rate=0.1)])
    report = Report()
    new = regularize.add_dropout(model, policy=policy, report=report)
    sites = _by_layer(report)
    assert sites["expand"] == (INSERT, "after sigmoid, rule 1 (match='expand')")
    assert sites["reduce"] == (SKIP, SE)
    assert inserted(new)["expand__dropout"] == ("SpatialDropout2D", 0.1)
    _check_rewrite(model, new, x, expected, before, tmp_path)


@pytest.mark.parametrize(
    "rule",
    [Rule(rate=0.4), Rule(depth=(0.0, 1.0), rate=0.4), Rule(match="expand", rate=0.4, skip=True)],
    ids=["catch-all", "depth", "skip"],
)
def test_rules_that_do_not_name_a_gate_layer_leave_it_out(rule):
    report = Report()
    regularize.plan(se_block(), policy=Policy(rate=0.2, rules=[rule]), report=report)
    assert _by_layer(report)["reduce"] == (SKIP, SE)
    assert _by_layer(report)["expand"][0] == SKIP


@pytest.mark.parametrize(
    ("factory", "gate", "shape", "reason"),
    [(se_block, "expand", (8, 8, 3), SE), (glu_block, "gate", (6,), gates.GATE)],
    ids=["se", "glu"],
)
def test_a_rerun_removes_the_dropout_an_earlier_version_put_in_a_gate(
    factory, gate, shape, reason, tmp_path
):
    """A model rewritten before gates were known gets its gate dropout removed."""
    model = factory()
    x = _x(shape)
    expected, before = predict(model, x), snapshot(model)
    named = Policy(rate=0.2, rules=[Rule(match=gate, rate=0.2)])
    old = regularize.add_dropout(model, policy=named)
    assert f"{gate}__dropout" in inserted(old)
    report = Report()
    new = regularize.add_dropout(old, 0.2, report=report)
    assert _by_layer(report)[gate] == (REMOVE, reason)
    assert f"{gate}__dropout" not in inserted(new)
    _check_rewrite(model, new, x, expected, before, tmp_path)


def test_a_product_of_two_feature_maps_is_no_gate():
    """`relu(a) * relu(b)` scales nothing: both sides stay sites."""
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, activation="relu", name="a")(inputs)
    b = L.Conv2D(4, 1, activation="relu", name="b")(inputs)
    x = L.Multiply(name="product")([a, b])
    outputs = L.Conv2D(2, 1, name="out")(x)
    report = Report()
    regularize.plan(keras.Model(inputs, outputs), 0.2, report=report)
    assert {s.layer: s.action for s in report.sites} == {"a": INSERT, "b": INSERT}


# -- scaled residual merges (drop path) -------------------------------------


def _residual(scale: str) -> keras.Model:
    """Two residual blocks `x + scale * branch`, the shortcut a 1x1 projection
    as long as the branch (so the lengths alone are ambiguous)."""
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    for i in (1, 2):
        branch = L.Conv2D(4, 3, padding="same", activation="relu", name=f"b{i}_conv")(x)
        branch = L.Conv2D(4, 1, name=f"b{i}_up")(branch)
        if scale == "custom":
            x = CustomScaleLayer(0.2, name=f"b{i}_merge")([x, branch])
        else:
            short = L.Conv2D(4, 1, name=f"b{i}_proj")(x)
            short = L.Conv2D(4, 1, name=f"b{i}_proj2")(short)
            if scale == "rescaling":
                scaled = L.Rescaling(0.2, name=f"b{i}_scale")(branch)
            else:
                scaled = branch * 0.2
            x = L.Add(name=f"b{i}_merge")([short, scaled])
        x = L.Activation("relu", name=f"b{i}_out")(x)
    outputs = L.Conv2D(2, 1, name="head")(x)
    return keras.Model(inputs, outputs, name=f"scaled_{scale}")


@pytest.mark.parametrize("scale", ["custom", "rescaling", "op"])
def test_drop_path_on_scaled_residual_merges(scale, tmp_path):
    model = _residual(scale)
    x = _x((8, 8, 4))
    expected, before = predict(model, x), snapshot(model)
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.2, report=report)
    sites = [s for s in report.sites if s.kind == "DropPath"]
    assert [(s.action, s.rate) for s in sites] == [(INSERT, 0.1), (INSERT, 0.2)]
    if scale == "custom":
        # The branch is the second input, the dropout goes before the scale.
        assert [s.layer for s in sites] == ["b1_up", "b2_up"]
        assert sites[0].reason == "block 1/2 before b1_merge, shortcut identity"
    else:
        assert sites[0].reason.startswith("block 1/2 before b1_merge, shortcut 2 layers")
    drops = {
        layer.name: tuple(layer.noise_shape)
        for layer in new.layers
        if layer.name.endswith("__droppath")
    }
    assert len(drops) == 2 and set(drops.values()) == {(None, 1, 1, 1)}
    _check_rewrite(model, new, x, expected, before, tmp_path)
    new.compile(optimizer="sgd", loss="mse")
    new.fit(x, np.asarray(expected[0]), epochs=1, verbose=0)


def test_the_scaled_side_of_an_add_is_the_branch_even_when_longer_shortcut():
    """Lengths say the projection (3 layers) is the branch; the scale says otherwise."""
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(2, 1, activation="relu", name="stem")(inputs)
    short = L.Conv2D(2, 1, name="p1")(x)
    short = L.Conv2D(2, 1, name="p2")(short)
    short = L.Conv2D(2, 1, name="p3")(short)
    branch = L.Conv2D(2, 1, name="r1")(x)
    x = L.Add(name="merge")([short, L.Rescaling(0.5, name="scale")(branch)])
    outputs = L.Conv2D(2, 1, name="head")(x)
    report = Report()
    regularize.plan(keras.Model(inputs, outputs), rate=0.0, drop_path=0.1, report=report)
    [site] = [s for s in report.sites if s.kind == "DropPath"]
    assert (site.layer, site.action) == ("scale", INSERT)


# -- the Keras 2 engine -------------------------------------------------------

_KERAS2_SE = """
import os, sys
import numpy as np, tf_keras as k
k.utils.set_random_seed(0)
L = k.layers
inp = k.Input((8, 8, 3))
x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
s = L.Conv2D(2, 1, activation="relu", name="reduce")(s)
s = L.Conv2D(8, 1, name="expand")(s)
s = L.ReLU(6.0, name="gate_relu6")(s + 3.0) * (1.0 / 6.0)  # TFOpLambda: a Keras 2 file
x = L.Multiply(name="excite")([x, s])
x = L.Conv2D(8, 3, padding="same", activation="sigmoid", name="after")(x)
x = L.Conv2D(8, 1, name="up")(x)
from tf_keras.src.applications.inception_resnet_v2 import CustomScaleLayer
x = CustomScaleLayer(0.2, name="merge")([x, L.Conv2D(8, 1, name="branch")(x)])
x = L.GlobalAveragePooling2D(name="pool")(x)
out = L.Dense(3, name="logits")(x)
m = k.Model(inp, out)
m.save(sys.argv[1])
"""


@pytest.mark.slow
def test_keras2_engine_skips_gates_and_finds_scaled_merges(tmp_path):
    from regularize import keras2

    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    path = tmp_path / "se.h5"
    done = subprocess.run(
        [sys.executable, "-c", _KERAS2_SE, str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert keras2.detect(path) == "keras2-h5"
    policy = {"rate": 0.2, "drop_path": 0.1}
    result = keras2.run(dict(mode="plan", input=path, policy=policy))
    sites = {(s["layer"], s["kind"]): (s["action"], s["reason"]) for s in result["sites"]}
    assert sites[("reduce", "SpatialDropout2D")] == (SKIP, SE)
    assert sites[("gate_relu6", "SpatialDropout2D")] == (SKIP, SE)
    assert sites[("conv", "SpatialDropout2D")][0] == INSERT
    assert sites[("branch", "DropPath")] == (INSERT, "block 1/1 before merge, shortcut identity")
    assert json.dumps(result["warnings"]) == "[]"


def test_a_top_down_path_through_other_blocks_is_no_residual_branch():
    """FPN: `upsample(deeper) + lateral(c1)`: the deeper path spans two residual blocks at a
    coarser resolution; it is skipped, the blocks themselves get their drop paths."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    c1 = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="down")(c1)
    for i in (1, 2):
        branch = L.Conv2D(4, 3, padding="same", activation="relu", name=f"b{i}_conv")(x)
        branch = L.Conv2D(4, 1, name=f"b{i}_up")(branch)
        x = L.Add(name=f"b{i}_add")([x, branch])
    top = L.UpSampling2D(name="upsample")(x)
    lateral = L.Conv2D(4, 1, name="lateral")(c1)
    x = L.Add(name="fpn_add")([top, lateral])
    outputs = L.Conv2D(2, 1, name="head")(x)
    model = keras.Model(inputs, outputs)
    x_in = _x((8, 8, 4))
    expected = predict(model, x_in)
    report = Report()
    new = regularize.add_dropout(model, rate=0.0, drop_path=0.3, report=report)
    sites = {s.layer: (s.action, s.reason) for s in report.sites if s.kind == "DropPath"}
    assert sites == {
        "b1_up": (INSERT, "block 1/3 before b1_add, shortcut identity"),
        "b2_up": (INSERT, "block 2/3 before b2_add, shortcut identity"),
        "fpn_add": (
            SKIP,
            "the branch spans 2 other residual merges at a coarser resolution: a long skip, "
            "not a block",
        ),
    }
    for left, right in zip(expected, predict(new, x_in), strict=True):
        np.testing.assert_array_equal(left, right)


# -- other placements a practitioner would reject -------------------------------


@pytest.mark.parametrize(
    "softmax",
    [lambda: L.Softmax(axis=1, name="weights"), lambda: L.Activation("softmax", name="weights")],
    ids=["Softmax", "Activation"],
)
def test_no_dropout_on_the_scores_of_a_softmax(softmax):
    """Attention pooling: tanh scores -> softmax over steps -> weighted sum."""
    inputs = keras.Input((5, 4))
    h = L.Dense(4, activation="relu", name="h")(inputs)
    scores = L.Dense(1, activation="tanh", name="scores")(h)
    weights = softmax()(scores)
    pooled = L.Dot(axes=1, name="pool")([weights, h])
    outputs = L.Dense(2, name="logits")(L.Flatten(name="flat")(pooled))
    report = Report()
    regularize.plan(keras.Model(inputs, outputs), 0.2, report=report)
    sites = _by_layer(report)
    assert sites["scores"] == (SKIP, "feeds a softmax")
    assert sites["h"][0] == INSERT
