"""MC dropout: `mc_predict` and the always-on `MC*` layers of `regularize.mc`."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from regularize import mc  # noqa: E402
from regularize.core.errors import RegularizeWarning  # noqa: E402
from regularize.core.errors import UnsupportedModelError  # noqa: E402

L = keras.layers


def _x(n=20, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


@pytest.fixture(scope="module")
def bn_model():
    """Compiled; BatchNormalization after a Dropout, dropout inside a nested model."""
    keras.utils.set_random_seed(1)
    inner_in = keras.Input((6,))
    h = L.Dense(8, activation="relu", name="inner_fc")(inner_in)
    h = L.Dropout(0.4, name="inner_drop")(h)
    inner = keras.Model(inner_in, h, name="inner")
    inp = keras.Input((6,), name="x")
    z = inner(inp, training=False)
    z = L.BatchNormalization(name="bn")(z)
    z = L.Dense(8, activation="relu", name="fc")(z)
    z = L.Reshape((2, 4), name="seq")(z)
    z = L.SpatialDropout1D(0.3, name="sdrop")(z)
    z = L.Flatten(name="flat")(z)
    out = {"cls": L.Dense(3, name="cls")(z), "reg": L.Dense(1, name="reg")(z)}
    model = keras.Model(inp, out, name="bn_model")
    model.compile(optimizer="adam", loss="mse")
    # Non-trivial moving statistics, so that a reset would show.
    model.get_layer("bn").moving_mean.assign(np.full(8, 0.5, "float32"))
    model.get_layer("bn").moving_variance.assign(np.full(8, 2.0, "float32"))
    return model


def _state(model):
    return [np.array(v) for v in model.variables]


def test_mc_predict_leaves_the_model_unchanged(bn_model):
    x = _x()
    before = _state(bn_model)
    layers = list(bn_model.layers)
    predicted = bn_model.predict(x, verbose=0)
    mean, std = mc.mc_predict(bn_model, x, samples=5, batch_size=8)
    after = _state(bn_model)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    bn = bn_model.get_layer("bn")
    np.testing.assert_array_equal(bn.moving_mean, np.full(8, 0.5, "float32"))
    np.testing.assert_array_equal(bn.moving_variance, np.full(8, 2.0, "float32"))
    assert bn_model.layers == layers
    assert type(bn_model.get_layer("sdrop")) is L.SpatialDropout1D
    assert type(bn_model.get_layer("inner").get_layer("inner_drop")) is L.Dropout
    assert not bn_model.optimizer.built  # no second optimizer built for the twin
    again = bn_model.predict(x, verbose=0)
    for key in predicted:
        np.testing.assert_array_equal(predicted[key], again[key])
    assert set(mean) == {"cls", "reg"}
    assert mean["cls"].shape == std["cls"].shape == (20, 3)
    assert mean["reg"].shape == (20, 1)


def test_mc_predict_samples_dropout_and_keeps_bn_in_inference(bn_model):
    x = _x()
    mean, std = mc.mc_predict(bn_model, x, samples=8, seed=3)
    assert (std["cls"] > 0).mean() > 0.5
    again, _ = mc.mc_predict(bn_model, x, samples=8, seed=3)
    np.testing.assert_array_equal(mean["cls"], again["cls"])
    other, _ = mc.mc_predict(bn_model, x, samples=8, seed=4)
    assert not np.array_equal(mean["cls"], other["cls"])
    # With the dropout layers at rate 0 the twin equals inference mode, BN
    # moving statistics included (training-mode BN would differ).
    for layer in (bn_model.get_layer("sdrop"), bn_model.get_layer("inner").get_layer("inner_drop")):
        layer.rate = 0.0
    try:
        mc._twins.clear()
        mean0, std0 = mc.mc_predict(bn_model, x, samples=2)
    finally:
        bn_model.get_layer("sdrop").rate = 0.3
        bn_model.get_layer("inner").get_layer("inner_drop").rate = 0.4
        mc._twins.clear()
    np.testing.assert_allclose(mean0["cls"], bn_model.predict(x, verbose=0)["cls"], atol=1e-6)
    assert np.all(std0["cls"] == 0)


def test_dropout_inside_a_nested_model_is_sampled():
    keras.utils.set_random_seed(2)
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5), L.Dropout(0.5)], name="inner")
    inp = keras.Input((6,))
    model = keras.Model(inp, L.Dense(2)(inner(inp)))
    _, std = mc.mc_predict(model, _x(), samples=4)
    assert std.shape == (20, 2)
    assert (std > 0).mean() > 0.5


def test_sequential_model_and_dataset_input():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, activation="relu"), L.Dropout(0.5), L.Dense(2)]
    )
    x = _x(13)
    mean, std = mc.mc_predict(model, x, samples=6, batch_size=4, seed=0)
    assert mean.shape == std.shape == (13, 2)
    assert std.min() >= 0 and std.max() > 0
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(13))).batch(4)
    ds_mean, ds_std = mc.mc_predict(model, dataset, samples=6, seed=0)
    np.testing.assert_allclose(ds_mean, mean, atol=1e-6)
    np.testing.assert_allclose(ds_std, std, atol=1e-6)


def test_std_is_zero_without_dropout():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="relu"), L.Dense(2)])
    with pytest.warns(RegularizeWarning, match="no dropout layer"):
        mean, std = mc.mc_predict(model, _x(), samples=5)
    assert np.all(std == 0)
    np.testing.assert_allclose(mean, model.predict(_x(), verbose=0), atol=1e-6)


def test_rnn_dropout_is_not_sampled_and_says_so():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4, 3)), L.LSTM(4, dropout=0.5, name="lstm"), L.Dense(2)])
    with pytest.warns(RegularizeWarning) as record:
        _, std = mc.mc_predict(model, _x(3, 12).reshape(3, 4, 3), samples=3)
    assert np.all(std == 0)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'lstm' (LSTM) keeps its dropout off in `mc_predict`" in messages[0]
    assert "has no dropout layer that `mc_predict` can sample" in messages[1]


def test_mc_mean_converges_to_the_deterministic_prediction():
    """Dropout right before a linear head: E[MC output] is the inference output."""
    keras.utils.set_random_seed(6)
    x = _x(64, 6)
    y = (x @ np.arange(1, 7, dtype="float32")[:, None]).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(16, activation="relu"),
            L.Dropout(0.3),
            L.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    exact = model.predict(x, verbose=0)
    errors = {}
    for samples in (4, 64, 1024):
        mean, _ = mc.mc_predict(model, x, samples=samples, batch_size=64, seed=7)
        errors[samples] = float(np.abs(mean - exact).mean())
    # The error of a mean of n samples falls like 1/sqrt(n): 16x fewer per step.
    assert errors[64] < errors[4] / 2
    assert errors[1024] < errors[64] / 2
    assert errors[1024] < 0.02 * float(np.abs(exact).mean())


@pytest.mark.parametrize("name", sorted(mc.MC_CLASSES))
def test_mc_layers_stay_active_at_inference(name):
    keras_class = getattr(L, name)
    shape = {"SpatialDropout1D": (2, 6, 4), "SpatialDropout3D": (2, 2, 2, 2, 4)}.get(
        name, (2, 4, 4, 4) if name == "SpatialDropout2D" else (2, 64)
    )
    x = np.ones(shape, "float32")
    plain = keras_class(0.5, seed=1)
    twin = mc.make_mc(plain)
    assert type(twin) is mc.MC_CLASSES[name]
    assert isinstance(twin, keras_class)
    assert twin.get_config() == plain.get_config()
    np.testing.assert_array_equal(plain(x, training=False), x)
    assert not np.array_equal(np.asarray(twin(x, training=False)), x)
    assert not np.array_equal(np.asarray(twin(x)), x)


def test_make_mc_refuses_other_layers():
    with pytest.raises(TypeError, match="Received: layer of type 'Dense'"):
        mc.make_mc(L.Dense(2))


def test_saved_mc_model_loads_and_stays_stochastic(tmp_path):
    """What `add-dropout --mc` writes: MC layers predict stochastically after loading."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((6,))
    h = L.Dense(16, activation="relu", name="fc")(inp)
    mc_out = L.Dense(2, name="out")(mc.MCDropout(0.5, name="fc__dropout")(h))
    plain_out = L.Dense(2, name="out")(L.Dropout(0.5, name="fc__dropout")(h))
    x = _x()
    for out, stochastic in ((mc_out, True), (plain_out, False)):
        path = tmp_path / f"{stochastic}.keras"
        keras.Model(inp, out).save(path)
        loaded = keras.models.load_model(path)
        assert (type(loaded.get_layer("fc__dropout")) is mc.MCDropout) == stochastic
        first = loaded.predict(x, verbose=0)
        second = loaded.predict(x, verbose=0)
        assert (not np.array_equal(first, second)) == stochastic
    assert keras.saving.get_registered_object("regularize>MCSpatialDropout2D") is (
        mc.MCSpatialDropout2D
    )


def test_bad_arguments_are_refused(bn_model):
    with pytest.raises(ValueError, match=r"Expected an int >= 1. Received: samples=0"):
        mc.mc_predict(bn_model, _x(), samples=0)
    with pytest.raises(ValueError, match=r"Received: batch_size=2.5"):
        mc.mc_predict(bn_model, _x(), batch_size=2.5)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="subclassed model 'Sub'"):
        mc.mc_predict(Sub(), _x())
    unbuilt = keras.Sequential([L.Dense(2), L.Dropout(0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="not built"):
            mc.mc_predict(unbuilt, _x())
