"""Nested outputs, composite layers, token states, quantized and LoRA models.

- The output of a nested model that its caller reads further is a site like
  any other; "model output" is only the whole model's output.
- Only Keras' own layers have a fused activation site; a custom or composite
  layer (a keras-hub transformer block) is rebuilt through its own dropout
  keys or skipped with a reason.
- Rank-3 token states (an Embedding or attention layer upstream) get
  element-wise Dropout; Conv1D channel maps keep SpatialDropout1D.
- After `model.quantize(...)` new dropout layers take the float policy the
  quantized one came from; LoRA-enabled layers keep their LoRA weights and
  trainable state through rewrite and reload.

Every rewrite: structure, bit-exact inference against outputs captured
before it, `.keras` save/reload, and one `fit` step where training applies.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import regularize
from regularize.core.report import Report

L = keras.layers


def _sites(report):
    return {s.layer: s for s in report.sites}


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _check(model, new, x, tmp_path, *, fit=True, name="new.keras"):
    """Bit-exact inference against `model` (captured first), save/reload, one fit step."""
    expected = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(expected, np.asarray(new(x, training=False)))
    path = tmp_path / name
    new.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(expected, np.asarray(again(x, training=False)))
    if fit:
        again.compile(optimizer="sgd", loss="mse")
        target = np.zeros(expected.shape, "float32")
        loss = again.fit(x, target, epochs=1, verbose=0).history["loss"][0]
        assert np.isfinite(loss)
    return again


# -- nested outputs (point 5) ---------------------------------------------


def _inner(name="inner", activation="relu"):
    inp = keras.Input((4,))
    return keras.Model(inp, L.Dense(4, activation=activation, name="feat")(inp), name=name)


@pytest.mark.parametrize("preset", ["all", "head"])
def test_nested_output_that_feeds_a_layer_is_a_site(preset, tmp_path):
    inner = _inner()
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(2, name="head")(inner(inp)))
    x = _x(3, 4)
    report = Report()
    new = regularize.add_dropout(
        model, policy=regularize.Policy(rate=0.3, preset=preset), report=report
    )
    site = _sites(report)["inner/feat"]
    assert (site.action, site.kind, site.rate) == ("insert", "Dropout", 0.3)
    new_inner = new.get_layer("inner")
    assert [layer.name for layer in new_inner.layers[1:]] == ["feat", "feat__dropout"]
    assert model.get_layer("inner") is inner and len(inner.layers) == 2  # input untouched
    _check(model, new, x, tmp_path)


def test_nested_block_output_is_a_site_for_the_blocks_preset(tmp_path):
    inp = keras.Input((4,))
    a = L.Dense(4, activation="relu", name="a")(inp)
    b = L.Dense(4, name="b")(a)
    inner = keras.Model(inp, L.Add(name="merge")([a, b]), name="block")
    outer_in = keras.Input((4,))
    model = keras.Model(outer_in, L.Dense(2, name="head")(inner(outer_in)))
    report = Report()
    new = regularize.add_dropout(model, policy=regularize.Policy(preset="blocks"), report=report)
    site = _sites(report)["block/merge"]
    assert (site.action, site.kind) == ("insert", "Dropout")
    assert new.get_layer("block").layers[-1].name == "merge__dropout"
    _check(model, new, _x(3, 4, seed=1), tmp_path)


def test_nested_output_that_is_the_model_output_stays_skipped():
    inner = _inner()
    inp = keras.Input((4,))
    model = keras.Model(inp, inner(inp))
    report = Report()
    regularize.plan(model, 0.3, report=report)
    assert (report.sites[0].layer, report.sites[0].reason) == ("inner/feat", "model output")


def test_nested_output_followed_by_batchnorm_in_the_caller_is_skipped():
    inner = _inner()
    inp = keras.Input((4,))
    model = keras.Model(inp, L.BatchNormalization(name="bn")(inner(inp)))
    report = Report()
    regularize.plan(model, 0.3, report=report)
    site = _sites(report)["inner/feat"]
    assert (site.action, site.reason) == ("skip", "feeds BatchNormalization")


# -- composite layers and token states (point 6) --------------------------


@keras.saving.register_keras_serializable(package="modern_test")
class Residual(L.Layer):
    """A composite block: its `activation` is its inner layer's, not its output's."""

    def __init__(self, units=4, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.inner = L.Dense(units, activation=activation)

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, x):
        return x + self.inner(x)

    def get_config(self):
        config = {"units": self.units, "activation": keras.activations.serialize(self.activation)}
        return {**super().get_config(), **config}


def test_a_composite_layer_is_no_activation_site(tmp_path):
    inp = keras.Input((4,))
    x = Residual(4, name="res")(inp)
    x = L.Dense(4, activation="relu", name="fc")(x)
    model = keras.Model(inp, L.Dense(2, name="out")(x))
    report = Report()
    new = regularize.add_dropout(model, 0.3, report=report)
    sites = _sites(report)
    assert (sites["res"].action, sites["res"].kind) == ("skip", "owned")
    assert (
        sites["res"].reason == "Residual applies its activation inside and has no dropout setting"
    )
    assert (sites["fc"].action, sites["fc"].kind) == ("insert", "Dropout")
    assert [layer.name for layer in new.layers[1:]] == ["res", "fc", "fc__dropout", "out"]
    _check(model, new, _x(3, 4, seed=2), tmp_path)


def _sequence_models():
    ids = keras.Input((6,), dtype="int32")
    e = L.Embedding(20, 8, name="emb")(ids)
    tok = L.Dense(8, activation="relu", name="tok")(e)
    text = keras.Model(ids, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(tok)))
    seq = keras.Input((6, 3))
    c = L.Conv1D(8, 3, activation="relu", name="conv")(seq)
    conv = keras.Model(seq, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(c)))
    att = L.MultiHeadAttention(2, 4, name="mha")(seq, seq)
    a = L.Dense(8, activation="relu", name="after_attention")(att)
    attention = keras.Model(seq, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(a)))
    return text, conv, attention


def test_token_states_get_dropout_and_conv1d_maps_spatial_dropout(tmp_path):
    text, conv, attention = _sequence_models()
    kinds = {}
    for model in (text, conv, attention):
        report = Report()
        regularize.plan(model, 0.3, report=report)
        kinds.update({s.layer: s.kind for s in report.sites if s.action == "insert"})
    assert kinds == {"tok": "Dropout", "conv": "SpatialDropout1D", "after_attention": "Dropout"}
    ids = np.random.default_rng(0).integers(0, 20, (3, 6)).astype("int32")
    new = regularize.add_dropout(text, 0.3)
    assert type(new.get_layer("tok__dropout")) is L.Dropout
    assert new.get_layer("tok__dropout").noise_shape is None
    _check(text, new, ids, tmp_path)


@pytest.mark.slow
def test_gpt2_backbone_plan_has_no_activation_site_inside_its_blocks():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    # The graph walk (what a keras-hub block inside a user's own Functional model gets):
    # the blocks are sites through their own dropout key, never activation sites.
    from regularize.core.policy import Policy
    from regularize.keras3 import rewrite

    report = Report()
    rewrite.rewrite(backbone, Policy(rate=0.2), build=False, report=report)
    sites = [(s.layer, s.layer_class, s.kind, s.action, s.reason) for s in report.sites]
    assert sites == [
        (f"transformer_layer_{i}", "TransformerDecoder", "owned", "update", "dropout 0.1 -> 0.2")
        for i in range(2)
    ]
    # The public API gives a keras-hub backbone to `regularize.keras3.hub` (its class stays): an
    # explicit rate sets the constructor's own `dropout=0.1`; `existing="keep"` keeps it.
    report = Report()
    regularize.plan(backbone, 0.2, report=report)
    assert [(s.layer, s.kind, s.action) for s in report.sites] == [
        (backbone.name, "dropout", "update")
    ]
    report = Report()
    regularize.plan(backbone, policy=Policy(rate=0.2, existing="keep"), report=report)
    assert [(s.layer, s.kind, s.action) for s in report.sites] == [
        (backbone.name, "dropout", "keep")
    ]


# -- quantized and LoRA models (point 7) ----------------------------------


def _dense_model(dtype=None):
    inp = keras.Input((8,))
    x = L.Dense(16, activation="relu", name="fc1", dtype=dtype)(inp)
    x = L.Dense(16, activation="relu", name="fc2", dtype=dtype)(x)
    return keras.Model(inp, L.Dense(3, name="out", dtype=dtype)(x))


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_model_gets_float_dropout(mode, tmp_path):
    model = _dense_model()
    model.quantize(mode)
    assert model.get_layer("fc1").dtype_policy.quantization_mode == mode
    x = _x(4, 8, seed=3)
    report = Report()
    new = regularize.add_dropout(model, 0.25, report=report)
    assert [s.layer for s in report.sites if s.action == "insert"] == ["fc1", "fc2"]
    for name in ("fc1__dropout", "fc2__dropout"):
        layer = new.get_layer(name)
        assert layer.dtype_policy.name == "float32"
        assert layer.dtype_policy.quantization_mode is None
    assert new.get_layer("fc1") is model.get_layer("fc1")
    new(x, training=True)  # the call that raised NotImplementedError (`_int8_call`)
    again = _check(model, new, x, tmp_path, fit=False)
    assert again.get_layer("fc1").dtype_policy.quantization_mode == mode


@pytest.mark.slow
def test_quantized_mixed_bfloat16_keeps_the_mixed_policy(tmp_path):
    model = _dense_model(dtype="mixed_bfloat16")
    model.quantize("int8")
    assert model.get_layer("fc1").dtype_policy.name == "int8_from_mixed_bfloat16"
    new = regularize.add_dropout(model, 0.25)
    assert new.get_layer("fc1__dropout").dtype_policy.name == "mixed_bfloat16"
    _check(model, new, _x(4, 8, seed=4), tmp_path, fit=False)


def test_mixed_float16_is_kept_as_before():
    model = _dense_model(dtype="mixed_float16")
    new = regularize.add_dropout(model, 0.25)
    assert new.get_layer("fc1__dropout").dtype_policy.name == "mixed_float16"
    x = _x(4, 8, seed=5)
    np.testing.assert_array_equal(model(x, training=False), new(x, training=False))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lora_layers_keep_their_weights_and_trainable_state(quantize, tmp_path):
    model = _dense_model()
    if quantize:
        model.quantize(quantize)
    for name in ("fc1", "fc2"):
        model.get_layer(name).enable_lora(2)
    lora_b = model.get_layer("fc2").lora_kernel_b
    lora_b.assign(_x(*lora_b.shape, seed=6))  # a fine-tuned adapter, not zeros
    trainable = sorted(v.path for v in model.trainable_weights)
    x = _x(4, 8, seed=7)
    # Keras saves a quantized LoRA layer with the adapter merged into the
    # re-quantized kernel, so the reference after reload is the input's own
    # reload (captured before the rewrite).
    model.save(tmp_path / "old.keras")
    reloaded = keras.models.load_model(tmp_path / "old.keras")(x, training=False)
    new = regularize.add_dropout(model, 0.25)
    fc2 = new.get_layer("fc2")
    assert fc2 is model.get_layer("fc2") and fc2.lora_enabled
    assert fc2.lora_kernel_b is lora_b  # the same variable
    assert sorted(v.path for v in new.trainable_weights) == trainable
    assert fc2._kernel.trainable is False
    np.testing.assert_array_equal(model(x, training=False), new(x, training=False))
    new.save(tmp_path / "new.keras")
    again = keras.models.load_model(tmp_path / "new.keras")
    np.testing.assert_array_equal(reloaded, again(x, training=False))
    if not quantize:
        np.testing.assert_array_equal(model(x, training=False), again(x, training=False))
    fc2 = again.get_layer("fc2")
    assert fc2.lora_enabled and fc2.lora_rank == 2
    assert sorted(v.path for v in again.trainable_weights) == trainable
    assert "fc1__dropout" in [layer.name for layer in again.layers]
    again.compile(optimizer="sgd", loss="mse")
    loss = again.fit(x, np.zeros((4, 3), "float32"), epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)


@pytest.mark.slow
def test_quantized_attention_is_not_rebuilt():
    seq = keras.Input((6, 8))
    att = L.MultiHeadAttention(2, 4, name="mha")(seq, seq)
    model = keras.Model(seq, L.Dense(2, name="out")(att))
    model.quantize("int8")
    report = Report()
    new = regularize.add_dropout(model, 0.2, attention_rate=0.1, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.reason) == (
        "skip",
        "holds int8-quantized layers: rebuilt from its config they would be float",
    )
    assert new.get_layer("mha") is model.get_layer("mha")
    x = _x(2, 6, 8, seed=8)
    np.testing.assert_array_equal(model(x, training=False), new(x, training=False))


def test_attention_with_lora_sublayers_is_not_rebuilt():
    seq = keras.Input((6, 8))
    att = L.MultiHeadAttention(2, 4, name="mha")(seq, seq)
    model = keras.Model(seq, L.Dense(2, name="out")(att))
    model.get_layer("mha")._query_dense.enable_lora(2)
    report = Report()
    regularize.plan(model, 0.2, attention_rate=0.1, report=report)
    site = _sites(report)["mha"]
    assert (site.action, site.reason) == (
        "skip",
        "holds LoRA-enabled layers: rebuilt from its config they would lose LoRA",
    )
