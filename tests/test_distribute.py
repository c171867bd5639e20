"""A rewritten model fine-tunes under `tf.distribute.MirroredStrategy`.

TensorFlow fixes its logical devices when it first initialises them, and this test session
has done so already; the training therefore runs in a child process that splits the CPU in
two logical devices before anything else, loads the rewritten `.keras` file inside
`strategy.scope()` with plain Keras (no regularize), checks the predictions, and fits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import cnn_functional
from helpers import inserted
from helpers import predict

import regularize

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="tf.distribute needs the TensorFlow backend",
    ),
]

CHILD = textwrap.dedent(
    """
    import json
    import sys

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

    import keras
    import numpy as np

    path, folder = sys.argv[1], sys.argv[2]
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = keras.models.load_model(path)
    x = np.load(folder + "/x.npy")
    y = np.load(folder + "/y.npy")
    expected = np.load(folder + "/expected.npy")
    predicted = np.asarray(model(x[: len(expected)], training=False))
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = [np.array(w) for w in model.trainable_weights]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "mirrored": all(
            strategy.extended.variable_created_in_scope(v.value) for v in model.weights
        ),
        "optimizer_mirrored": all(
            strategy.extended.variable_created_in_scope(v.value)
            for v in model.optimizer.variables
        ),
        "dropout_layers": sorted(
            layer.name for layer in model.layers if layer.name.endswith("__dropout")
        ),
        "predictions_equal": bool(np.array_equal(predicted, expected)),
        "loss": history.history["loss"],
        "changed": sum(not np.array_equal(a, b) for a, b in zip(before, after)),
        "trainable": len(after),
    }))
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Rewrites a compiled CNN, saves it, fine-tunes it on two replicas in a child."""
    folder = tmp_path_factory.mktemp("distribute")
    case = cnn_functional()
    case.model.compile(optimizer="adam", loss="mse")
    new = regularize.add_dropout(case.model, 0.3)
    path = folder / "rewritten.keras"
    regularize.save_model(new, path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 12, 12, 3)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    np.save(folder / "expected.npy", predict(new, x[:4])[0])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("TF_USE_LEGACY_KERAS", None)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # What the tests below rest on (TensorFlow's part, not this project's): two replicas.
    assert result["replicas"] == 2 and len(set(result["devices"])) == 2, result
    return new, result


SWEEP_CHILD = textwrap.dedent(
    """
    import json
    import sys

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

    from regularize.sweep import run_sweep

    path, data, out = sys.argv[1:4]
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    result = run_sweep(
        path, data, [0, 0.5], epochs=2, strategy=strategy, out=out, batch_size=8,
        progress=False,
    )
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, **result.to_dict()}))
    """
)


def test_sweep_trains_every_variant_on_two_replicas(tmp_path):
    """`run_sweep` under a two-replica MirroredStrategy: every variant trained and written."""
    model = tmp_path / "model.keras"
    regularize.save_model(cnn_functional().model, model)  # not compiled: the default
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 2, 24).astype("int32")
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x[:16], y_train=y[:16], x_val=x[16:], y_val=y[16:])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("TF_USE_LEGACY_KERAS", None)
    run = subprocess.run(
        [sys.executable, "-c", SWEEP_CHILD, str(model), str(data), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["settings"]["strategy"] == "MirroredStrategy"
    assert [(v["label"], v["epochs"]) for v in result["variants"]] == [("0", 2), ("0.5", 2)]
    assert all(np.isfinite(v["history"]["loss"]).all() for v in result["variants"])
    assert result["variants"][1]["sites"][0].startswith("inserted 4 sites")
    assert result["compile"].startswith("the model is not compiled")
    assert (tmp_path / "out" / "results.json").is_file()


def test_model_and_optimizer_built_in_strategy_scope(trained):
    _, result = trained
    assert result["mirrored"] is True
    assert result["optimizer_mirrored"] is True


def test_loaded_inside_scope_keeps_dropout_and_predictions(trained):
    new, result = trained
    assert result["dropout_layers"] == sorted(inserted(new))
    assert len(result["dropout_layers"]) == 4
    assert result["predictions_equal"] is True


def test_fit_updates_weights_with_finite_loss(trained):
    _, result = trained
    assert len(result["loss"]) == 1
    assert np.isfinite(result["loss"][0])
    assert result["changed"] == result["trainable"] > 0
