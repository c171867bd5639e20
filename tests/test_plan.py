"""Where dropout goes and why not elsewhere; re-runs; remove_dropout."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import L
from helpers import assert_exact
from helpers import cnn_functional
from helpers import inserted
from helpers import mlp_sequential
from helpers import recurrent
from helpers import rnn_dropout

import regularize


def _by_layer(sites):
    return {s.layer: (s.action, s.reason) for s in sites}


def test_plan_reasons_on_cnn():
    case = cnn_functional()
    sites = _by_layer(regularize.plan(case.model, rate=0.3))
    assert sites == {
        "c1": ("skip", "feeds BatchNormalization"),
        "r2": ("insert", "after relu"),
        "c3": ("insert", "after silu"),
        "leaky": ("insert", "after leakyrelu"),
        "fc": ("insert", "after gelu"),
    }


def test_plan_builds_nothing():
    case = cnn_functional()
    nodes = {layer.name: len(layer._inbound_nodes) for layer in case.model.layers}
    regularize.plan(case.model, rate=0.3)
    assert {layer.name: len(layer._inbound_nodes) for layer in case.model.layers} == nodes


def test_plan_matches_rewrite():
    case = cnn_functional()
    report = regularize.Report()
    regularize.add_dropout(case.model, 0.3, report=report)
    assert report.sites == regularize.plan(case.model, 0.3)


def test_never_after_model_output():
    case = mlp_sequential()
    sites = _by_layer(regularize.plan(case.model))
    assert sites["probs"] == ("skip", "model output")


def test_existing_user_dropout_is_kept_not_stacked():
    inp = keras.Input((4,))
    x = L.Dense(4, activation="relu", name="fc")(inp)
    x = L.Dropout(0.5, name="user_drop")(x)
    out = L.Dense(1, name="out")(x)
    model = keras.Model(inp, out)
    report = regularize.Report()
    new = regularize.add_dropout(model, 0.2, report=report)
    assert _by_layer(report.sites)["fc"] == ("keep", "already followed by Dropout")
    assert new.get_layer("user_drop").rate == 0.5
    assert inserted(new) == {}


def test_rerun_same_rate_changes_nothing():
    case = cnn_functional()
    once = regularize.add_dropout(case.model, 0.3)
    report = regularize.Report()
    twice = regularize.add_dropout(once, 0.3, report=report)
    assert inserted(twice) == inserted(once)
    assert report.changed() == 0
    assert [layer.name for layer in twice.layers] == [layer.name for layer in once.layers]


def test_rerun_new_rate_updates_in_place():
    case = cnn_functional()
    once = regularize.add_dropout(case.model, 0.3)
    report = regularize.Report()
    twice = regularize.add_dropout(once, 0.5, report=report)
    assert {k: v[1] for k, v in inserted(twice).items()} == dict.fromkeys(inserted(once), 0.5)
    assert [layer.name for layer in twice.layers] == [layer.name for layer in once.layers]
    assert {s.action for s in report.sites} == {"update", "skip"}
    # the first rewrite's layers are not mutated
    assert {v[1] for v in inserted(once).values()} == {0.3}
    assert_exact(case.model, twice, case.x)


def test_rerun_rate_zero_removes_own_layers_only():
    inp = keras.Input((4,))
    x = L.Dense(4, activation="relu", name="fc")(inp)
    x = L.Dropout(0.5, name="user_drop")(x)
    x = L.Dense(4, activation="relu", name="fc2")(x)
    out = L.Dense(1, name="out")(x)
    model = keras.Model(inp, out)
    once = regularize.add_dropout(model, 0.3)
    assert set(inserted(once)) == {"fc2__dropout"}
    zero = regularize.add_dropout(once, 0.0)
    assert inserted(zero) == {}
    assert "user_drop" in [layer.name for layer in zero.layers]


def test_remove_dropout_restores_structure():
    case = cnn_functional()
    new = regularize.add_dropout(case.model, 0.3)
    report = regularize.Report()
    stripped = regularize.remove_dropout(new, report=report)
    assert [layer.name for layer in stripped.layers] == [layer.name for layer in case.model.layers]
    assert sum(s.action == "remove" for s in report.sites) == 4
    assert_exact(case.model, stripped, case.x)


def _outputs(model, x) -> list:
    return [np.asarray(t) for t in keras.tree.flatten(model(x, training=False))]


def test_remove_dropout_strips_every_family_member_and_rnn_settings():
    inp = keras.Input((6, 3))
    h = L.LSTM(4, dropout=0.2, return_sequences=True, name="lstm")(inp)
    h = L.GRU(4, dropout=0.1, recurrent_dropout=0.2, return_sequences=True, name="gru")(h)
    h = L.SpatialDropout1D(0.1, name="sd")(h)
    h = L.GaussianDropout(0.1, name="gd")(h)
    h = L.Flatten(name="flat")(h)
    h = L.AlphaDropout(0.1, name="ad")(h)
    h = L.Dense(3, activation="selu", name="fc")(h)
    h = L.Dropout(0.3, name="plain")(h)
    out = L.Dense(1, name="out")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype("float32")
    expected = _outputs(model, x)
    report = regularize.Report()
    stripped = regularize.remove_dropout(model, report=report)
    names = [layer.name for layer in stripped.layers]
    assert names[1:] == ["lstm", "gru", "flat", "fc", "out"]
    for name in ("lstm", "gru"):
        layer = stripped.get_layer(name)
        assert (layer.dropout, layer.recurrent_dropout) == (0.0, 0.0)
    # No LSTM kernel changed (its recurrent_dropout was 0; GRU's kernels
    # round alike): bit-exact, and nothing to warn about.
    assert report.warnings == []
    for a, b in zip(expected, _outputs(stripped, x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_remove_recurrent_dropout_from_lstm_warns_of_the_kernel_change(monkeypatch):
    from regularize.core import terms
    from regularize.keras3 import rewrite

    # The Python warning fires once per process; another test may have had it.
    monkeypatch.setattr(rewrite, "_warned", set())
    inp = keras.Input((6, 3))
    h = L.LSTM(4, recurrent_dropout=0.1, return_sequences=True, name="lstm")(inp)
    out = L.Dense(1, name="out")(L.Flatten(name="flat")(h))
    model = keras.Model(inp, out)
    assert model.get_layer("lstm").cell.implementation == 1  # forced by recurrent dropout
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype("float32")
    expected = _outputs(model, x)
    report = regularize.Report()
    with pytest.warns(regularize.RegularizeWarning, match="back to its fused kernel"):
        stripped = regularize.remove_dropout(model, report=report)
    assert report.warnings == [terms.LSTM_KERNEL_BACK]
    lstm = stripped.get_layer("lstm")
    assert (lstm.recurrent_dropout, lstm.cell.implementation) == (0.0, 2)
    # Not bit-exact: the fused kernel rounds differently, by what the warning says.
    (a,) = expected
    (b,) = _outputs(stripped, x)
    assert np.max(np.abs(a - b)) <= 1e-6
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Once stripped, the model stays as it is: a second run is bit-exact, silent.
    again_report = regularize.Report()
    again = regularize.remove_dropout(stripped, report=again_report)
    assert again_report.warnings == []
    np.testing.assert_array_equal(_outputs(again, x)[0], b)


def test_recurrent_rate_sets_both_directions_and_warns(monkeypatch):
    from regularize.core import terms
    from regularize.keras3 import rewrite

    # The Python warning fires once per process; another test may have had it.
    monkeypatch.setattr(rewrite, "_warned", set())
    case = recurrent()
    expected = _outputs(case.model, case.x)
    report = regularize.Report()
    with pytest.warns(regularize.RegularizeWarning, match="per-gate kernel"):
        new = regularize.add_dropout(case.model, 0.25, recurrent_rate=0.1, report=report)
    bi = new.get_layer("bi")
    for layer in (bi.forward_layer, bi.backward_layer):
        assert (layer.dropout, layer.recurrent_dropout) == (0.25, 0.1)
    assert new.get_layer("gru").recurrent_dropout == 0.1
    assert report.warnings == [terms.CUDNN, terms.LSTM_KERNEL]
    # LSTM switches kernel (implementation=1) with recurrent dropout: equal to
    # float rounding only, by what the warning says (about 1e-7).
    for a, b in zip(expected, _outputs(new, case.x), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-6
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recurrent_rate_on_gru_only_is_bit_exact():
    inp = keras.Input((5, 3))
    out = L.GRU(4, name="gru")(inp)
    model = keras.Model(inp, out)
    new = regularize.add_dropout(model, 0.2, recurrent_rate=0.2)
    x = np.random.default_rng(1).normal(size=(2, 5, 3)).astype("float32")
    assert_exact(model, new, x)


def test_rnn_without_recurrent_rate_keeps_recurrent_dropout():
    case = recurrent()
    new = regularize.add_dropout(case.model, 0.3)
    assert new.get_layer("gru").recurrent_dropout == 0.0
    assert rnn_dropout(new)["gru"] == ("recurrent", 0.3)


def test_shared_rnn_stays_shared():
    inp_a = keras.Input((4, 2))
    inp_b = keras.Input((4, 2))
    lstm = L.LSTM(3, name="shared_lstm")
    out = L.Add()([lstm(inp_a), lstm(inp_b)])
    model = keras.Model([inp_a, inp_b], out)
    new = regularize.add_dropout(model, 0.3)
    rnns = [layer for layer in new.layers if isinstance(layer, L.LSTM)]
    assert len(rnns) == 1 and rnns[0].dropout == 0.3
    assert len(new.weights) == len(model.weights)


def test_rerun_on_recurrent_model_changes_nothing():
    case = recurrent()
    once = regularize.add_dropout(case.model, 0.3)
    report = regularize.Report()
    twice = regularize.add_dropout(once, 0.3, report=report)
    assert report.changed() == 0
    assert {s.action for s in report.sites} == {"keep"}
    for layer in once.layers:
        assert twice.get_layer(layer.name) is layer


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_nested_models_to_any_depth(depth):
    """Model in model in model ...: the innermost activation still gets dropout."""
    inp = keras.Input((4,))
    hidden = L.Dense(4, activation="relu", name="core")(inp)
    model = keras.Model(inp, L.Dense(4, name="core_out")(hidden), name="m0")
    for level in range(1, depth + 1):
        inner_in = keras.Input((4,))
        model = keras.Model(inner_in, model(inner_in), name=f"m{level}")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, L.Dense(1, name="out")(model(outer_in)))
    new = regularize.add_dropout(outer, 0.3)
    path = "/".join(f"m{level}" for level in range(depth, -1, -1))
    assert set(inserted(new)) == {f"{path}/core__dropout"}
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    assert_exact(outer, new, x)


def test_sequential_inside_functional_and_back():
    base = keras.Sequential(
        [keras.Input((6,)), L.Dense(5, activation="relu", name="b1"), L.Dense(4, name="b2")],
        name="seq_base",
    )
    inp = keras.Input((6,))
    outer = keras.Model(inp, L.Dense(2, name="o")(L.ReLU(name="r")(base(inp))))
    new = regularize.add_dropout(outer, 0.3)
    new_base = new.get_layer("seq_base")
    assert isinstance(new_base, keras.Sequential)
    assert [layer.name for layer in new_base.layers] == ["b1", "b1__dropout", "b2"]
    fn_in = keras.Input((6,))
    fn_base = keras.Model(
        fn_in,
        L.Dense(4, activation="tanh", name="f1")(L.Dense(4, activation="relu", name="f0")(fn_in)),
        name="fn_base",
    )
    seq = keras.Sequential([keras.Input((6,)), fn_base, L.Dense(2, name="o2")])
    new_seq = regularize.add_dropout(seq, 0.3)
    assert isinstance(new_seq, keras.Sequential)
    # fn_base's output feeds o2: a site like any other, not "model output".
    assert set(inserted(new_seq)) == {"fn_base/f0__dropout", "fn_base/f1__dropout"}
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    assert_exact(outer, new, x)
    assert_exact(seq, new_seq, x)


def test_keras_3_path_never_imports_tfmot_or_tf_keras():
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "import keras, regularize\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation='relu'),"
        " keras.layers.Dense(1)])\n"
        "regularize.add_dropout(m)\n"
        "regularize.plan(m)\n"
        "bad = [n for n in sys.modules if n.startswith(('tensorflow_model_optimization', "
        "'tf_keras'))]\n"
        "assert not bad, bad\n"
        "assert os.environ.get('TF_USE_LEGACY_KERAS') is None\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
