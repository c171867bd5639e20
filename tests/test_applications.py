"""Keras Applications (weights=None, small inputs): the real-world graphs.

Each one: dropout inserted, parameter count unchanged, inference bit-exact,
`.keras` reload exact. No network: `weights=None` only.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import assert_exact
from helpers import inserted

import regularize

APPS = {
    "ResNet50": (keras.applications.ResNet50, 32),
    "MobileNetV2": (keras.applications.MobileNetV2, 32),
    "MobileNetV3Small": (keras.applications.MobileNetV3Small, 32),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 32),
    "DenseNet121": (keras.applications.DenseNet121, 32),
    "InceptionV3": (keras.applications.InceptionV3, 75),
    "ConvNeXtTiny": (keras.applications.ConvNeXtTiny, 32),
    "NASNetMobile": (keras.applications.NASNetMobile, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPS))
def test_application(name, tmp_path):
    build, size = APPS[name]
    keras.utils.set_random_seed(0)
    # Logits, not softmax: with random weights the softmax of several of these
    # saturates (the same row for any input), and a comparison would prove little.
    model = build(weights=None, input_shape=(size, size, 3), classes=7, classifier_activation=None)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    logits = np.asarray(model(x, training=False))
    assert not np.array_equal(logits[0], logits[1])
    report = regularize.Report()
    new = regularize.add_dropout(model, 0.2, report=report)

    own = inserted(new)
    assert own and len(own) == sum(s.action == "insert" for s in report.sites)
    assert {rate for _, rate in own.values()} == {0.2}
    assert new.count_params() == model.count_params()
    assert new.output_names == model.output_names
    assert "predictions" not in {path[: -len("__dropout")] for path in own}
    old_ids = {id(v) for v in model.weights}
    assert {id(v) for v in new.weights} == old_ids  # the same variables, no copy
    assert_exact(model, new, x)

    report_again = regularize.Report()
    again = regularize.add_dropout(new, 0.2, report=report_again)
    assert report_again.changed() == 0  # a second run never stacks
    assert [layer.name for layer in again.layers] == [layer.name for layer in new.layers]

    path = tmp_path / f"{name}.keras"
    regularize.save_model(new, path)
    loaded = keras.models.load_model(path)
    assert inserted(loaded) == own
    assert_exact(new, loaded, x)


@pytest.mark.slow
def test_transfer_learning_pattern_with_frozen_application():
    """base(inputs, training=False) inside a head: only the head gets dropout."""
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35
    )
    base.trainable = False
    inputs = keras.Input((32, 32, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="head_fc")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head_out")(x)
    model = keras.Model(inputs, outputs)
    report = regularize.Report()
    new = regularize.add_dropout(model, 0.3, report=report)
    assert set(inserted(new)) == {"head_fc__dropout"}
    assert new.get_layer(base.name) is base and base.trainable is False
    inside = [s for s in report.sites if s.layer.startswith(base.name + "/")]
    assert inside and all("training=False" in s.reason for s in inside)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype("float32")
    assert_exact(model, new, x)
    # unfrozen and called normally, the base gets dropout too
    base.trainable = True
    x2 = keras.layers.GlobalAveragePooling2D()(base(inputs))
    model2 = keras.Model(inputs, keras.layers.Dense(3, name="out2")(x2))
    assert any(p.startswith(base.name + "/") for p in inserted(regularize.add_dropout(model2)))
