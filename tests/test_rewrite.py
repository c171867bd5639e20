"""Every factory: structure, bit-exact inference, save -> reload.

TensorFlow on a CPU cannot run channels_first convolutions everywhere (oneDNN can, on some
CPUs): there, the tests that run `conv_channels_first` assert that the same tests passed in a
child pytest on JAX, which runs them on any CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import FACTORIES
from helpers import L
from helpers import all_layers
from helpers import assert_outputs
from helpers import assert_same_model_except_dropout
from helpers import assert_snapshot_equal
from helpers import inserted
from helpers import predict
from helpers import rnn_dropout
from helpers import snapshot

import regularize
from regularize.keras3 import graph

ROOT = Path(__file__).resolve().parent.parent
# The tests below that run a model. Where this backend cannot run a factory's model on every
# machine (`Case.runs_here`), each asserts that the very same test passed on JAX instead.
RUN_ON_JAX = (
    "test_inference_bit_exact",
    "test_save_reload_exact",
    "test_dropout_is_active_in_training",
)
ON_JAX_FACTORIES = ("conv_channels_first",)  # the factories whose `runs_here` may be False


def _expected_own(case):
    return {k: v for k, v in case.expected.items() if v[0] != "recurrent"}


def _expected_rnn(case):
    return {k: v for k, v in case.expected.items() if v[0] == "recurrent"}


@pytest.fixture(scope="module", params=FACTORIES, ids=lambda f: f.__name__)
def rewritten(request):
    case = request.param()
    before = snapshot(case.model)
    # Captured before the rewrite: the new model shares the input's variables.
    case.outputs = predict(case.model, case.x) if case.runs_here else None
    new = regularize.add_dropout(case.model, rate=0.3)
    return case, before, new


@pytest.fixture(scope="module")
def jax_outcomes(tmp_path_factory):
    """Runs RUN_ON_JAX for ON_JAX_FACTORIES in a child pytest on JAX; outcome per test name."""
    assert keras.backend.backend() != "jax", "the JAX child never delegates again"
    report = tmp_path_factory.mktemp("jax_rewrite") / "junit.xml"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    ids = [f"tests/test_rewrite.py::{t}[{f}]" for t in RUN_ON_JAX for f in ON_JAX_FACTORIES]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
        + ["-o", "addopts=--strict-markers", f"--junitxml={report}", *ids]
        # A base temp of its own: a new pytest session prunes all but the last
        # three numbered ones, which would delete this session's, in use.
        + [f"--basetemp={report.parent / 'basetemp'}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert report.exists(), run.stdout[-4000:] + run.stderr[-2000:]
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        outcomes[case.get("name")] = (outcome, props.get("backend"))
    assert len(outcomes) == len(ids), run.stdout[-4000:] + run.stderr[-2000:]
    return outcomes, run.stdout[-4000:]


def _check_runs(case, request, record_property, check):
    """Runs `check()` where this backend can run `case.model`, else its test on JAX."""
    if case.runs_here:
        record_property("backend", keras.backend.backend())
        check()
        return
    outcomes, log = request.getfixturevalue("jax_outcomes")
    assert outcomes[request.node.name] == ("passed", "jax"), log


def test_structure(rewritten):
    case, before, new = rewritten
    assert inserted(new) == _expected_own(case)
    assert rnn_dropout(new) == _expected_rnn(case)
    if isinstance(case.model, keras.Sequential):
        assert isinstance(new, keras.Sequential)
    assert_same_model_except_dropout(case.model, new, before)


def test_inference_bit_exact(rewritten, request, record_property):
    case, _, new = rewritten
    _check_runs(case, request, record_property, lambda: assert_outputs(case.outputs, new, case.x))


def test_input_model_untouched(rewritten):
    case, before, _ = rewritten
    assert_snapshot_equal(before, snapshot(case.model))
    assert inserted(case.model) == {}


def test_shares_variables(rewritten):
    """Same variable objects, no copy (rebuilt RNN layers excepted)."""
    case, _, new = rewritten
    rebuilt = set(_expected_rnn(case))
    new_layers = dict(all_layers(new))
    for path, layer in all_layers(case.model):
        if path in rebuilt or graph.is_graph_model(layer):
            continue
        for v, w in zip(layer.weights, new_layers[path].weights, strict=True):
            assert v is w, path


def test_save_reload_exact(rewritten, tmp_path, request, record_property):
    case, _, new = rewritten
    path = tmp_path / "new.keras"
    regularize.save_model(new, path)
    loaded = keras.models.load_model(path)
    _check_runs(
        case, request, record_property, lambda: assert_outputs(case.outputs, loaded, case.x)
    )
    assert inserted(loaded) == _expected_own(case)
    assert rnn_dropout(loaded) == _expected_rnn(case)
    assert [p for p, _ in all_layers(loaded)] == [p for p, _ in all_layers(new)]

    # Keras restores the flags of layers with weights; it does not serialize a
    # nested model's own flag nor that of weightless layers (SpatialDropout*,
    # InputLayer): the input model reloads the same way.
    def flags(model):
        return {p: layer.trainable for p, layer in all_layers(model) if layer.weights}

    assert flags(loaded) == flags(new)
    assert loaded.compiled == case.model.compiled
    if case.model.compiled:
        assert loaded.get_compile_config()["loss"] == case.model.get_compile_config()["loss"]


def test_dropout_is_active_in_training(rewritten, request, record_property):
    """Inserted layers do fire: training outputs differ from inference ones."""
    case, _, new = rewritten

    def check():
        keras.utils.set_random_seed(0)
        train = [np.asarray(t) for t in keras.tree.flatten(new(case.x, training=True))]
        infer = [np.asarray(t) for t in keras.tree.flatten(case.model(case.x, training=True))]
        assert any(not np.array_equal(a, b) for a, b in zip(train, infer, strict=True))

    _check_runs(case, request, record_property, check)


def test_compiled_input_gives_compiled_output(rewritten):
    case, _, new = rewritten
    assert new.compiled == case.model.compiled
    if case.model.compiled:
        old_cfg = case.model.get_compile_config()
        new_cfg = new.get_compile_config()
        assert new_cfg["loss"] == old_cfg["loss"]
        assert new_cfg["metrics"] == old_cfg["metrics"]
        assert new_cfg["optimizer"] == old_cfg["optimizer"]
        assert new.optimizer is not case.model.optimizer
        assert not new.optimizer.built  # no slot variables (2x weights for Adam) yet


def test_nested_trainable_flags_kept():
    from helpers import nested_two_levels

    case = nested_two_levels()
    new = regularize.add_dropout(case.model, 0.3)
    mid = new.get_layer("mid")
    assert mid is not case.model.get_layer("mid")
    inner = mid.get_layer("inner")
    assert inner.trainable is False
    assert mid.trainable is True
    assert inner.get_layer("inner_conv").trainable is False
    assert inner.get_layer("inner_conv__dropout").trainable is False


def test_frozen_base_called_inference_only_is_reused_and_reported():
    from helpers import frozen_base_inference

    case = frozen_base_inference()
    report = regularize.Report()
    new = regularize.add_dropout(case.model, 0.3, report=report)
    assert new.get_layer("base") is case.model.get_layer("base")
    skipped = {s.layer: s.reason for s in report.sites if s.action == "skip"}
    assert "training=False" in skipped["base/b_conv"]
    assert "training=False" in skipped["base/b_conv2"]
    assert set(skipped) == {"base/b_conv", "base/b_conv2"}


def test_mixed_precision_dtype_follows_anchor():
    from helpers import mixed_precision

    case = mixed_precision()
    new = regularize.add_dropout(case.model, 0.3)
    assert new.get_layer("fc__dropout").dtype_policy.name == "mixed_float16"
    assert new.output.dtype == case.model.output.dtype == "float32"


def test_sequential_stays_sequential_with_order():
    from helpers import mlp_sequential

    case = mlp_sequential()
    new = regularize.add_dropout(case.model, 0.3)
    assert isinstance(new, keras.Sequential)
    assert [layer.name for layer in new.layers] == [
        "d1",
        "d1__dropout",
        "d2",
        "act",
        "act__dropout",
        "probs",
    ]
    assert new.name == "mlp"
    assert new.input_shape == case.model.input_shape


def test_dict_outputs_keep_names_for_compile_loss_dict():
    from helpers import multi_io_dict

    case = multi_io_dict()
    new = regularize.add_dropout(case.model, 0.3)
    out = new(case.x, training=False)
    assert set(out) == {"label", "value"}
    y = {"label": np.array([0, 1]), "value": np.zeros((2, 1), "float32")}
    history = new.fit(case.x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_channels_first_1d_drops_whole_channels():
    from helpers import conv_channels_first

    case = conv_channels_first()
    new = regularize.add_dropout(case.model, 0.5)
    layer = new.get_layer("cf1d__dropout")
    mask = np.asarray(layer(np.ones((1, 5, 8), "float32"), training=True))[0]
    # each channel row is all kept or all dropped
    assert all(len(set(row.tolist())) == 1 for row in mask)
    assert new.get_layer("prelu__dropout").data_format == "channels_first"


def test_ops_nodes_are_replayed():
    from helpers import ops_nodes

    case = ops_nodes()
    new = regularize.add_dropout(case.model, 0.3)
    old_ops = [type(op).__name__ for op in case.model.operations if not isinstance(op, L.Layer)]
    new_ops = [type(op).__name__ for op in new.operations if not isinstance(op, L.Layer)]
    assert old_ops and old_ops == new_ops


@contextlib.contextmanager
def _recursion_limit(limit):
    """The test's own recursion limit: Keras builds a model with one frame per layer."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.slow
def test_2000_layer_chain(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    x = inp
    for i in range(2000):
        x = L.Dense(4, activation="relu", name=f"d{i}")(x)
    out = L.Dense(1, name="out")(x)
    with _recursion_limit(20_000):  # Keras' own graph sort, before the tool runs
        model = keras.Model(inp, out)
    data = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    expected = np.asarray(model(data, training=False))  # captured before the rewrite
    report = regularize.Report()
    with pytest.warns(regularize.RegularizeWarning, match="sys.setrecursionlimit"):
        new = regularize.add_dropout(model, 0.1, report=report)
    assert len(inserted(new)) == 2000
    assert any("sys.setrecursionlimit" in w for w in report.warnings)
    np.testing.assert_array_equal(np.asarray(new(data, training=False)), expected)
    path = tmp_path / "deep.keras"
    regularize.save_model(new, path)
    loaded = regularize.load_model(path)
    assert len(loaded.layers) == len(new.layers)
    np.testing.assert_array_equal(np.asarray(loaded(data, training=False)), expected)


# A fresh process at the recursion limit some machines have once TensorFlow is imported
# (Python's default, 1,000; TensorFlow raises it to 3,000 on others). 600 layers build at
# that limit; dropout after each doubles the longest path past it. Activations, not Dense
# layers: depth is what matters, and 600 kernels would cost the child 15 s more.
DEEP_CHILD = textwrap.dedent(
    """
    import json
    import sys

    import keras
    import numpy as np

    import regularize

    sys.setrecursionlimit(1000)
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    x = inp
    for i in range(600):
        x = keras.layers.Activation("relu", name=f"a{i}")(x)
    model = keras.Model(inp, keras.layers.Dense(1, name="out")(x))
    new = regularize.add_dropout(model, 0.1)
    limit_after_rewrite = sys.getrecursionlimit()
    regularize.save_model(new, f"{out}/deep.keras")
    loaded = regularize.load_model(f"{out}/deep.keras")
    data = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    before = np.asarray(model(data, training=False))
    try:
        keras.Model(new.inputs, new.outputs)
        plain = "built"
    except RecursionError:
        plain = "RecursionError"
    print(json.dumps({
        "limit_after_rewrite": limit_after_rewrite,
        "limit_at_end": sys.getrecursionlimit(),
        "dropout_layers": sum(isinstance(layer, keras.layers.Dropout) for layer in new.layers),
        "layers": [len(new.layers), len(loaded.layers)],
        "exact": bool(np.array_equal(before, np.asarray(new(data, training=False)))),
        "reload_exact": bool(np.array_equal(before, np.asarray(loaded(data, training=False)))),
        "plain_keras_build": plain,
    }))
    """
)


def test_deep_chain_at_recursion_limit_1000(tmp_path):
    """The tool raises the limit for itself: rewrite, save, load at a limit of 1,000."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", DEEP_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {
        "limit_after_rewrite": 1000,
        "limit_at_end": 1000,
        "dropout_layers": 600,
        "layers": [1202, 1202],
        "exact": True,
        "reload_exact": True,
        # the rewritten model is deeper than the limit: without the tool's guards, its
        # rewrite and load would fail
        "plain_keras_build": "RecursionError",
    }
