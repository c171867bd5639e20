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
from conftest import cnn_functional
from conftest import inserted
from conftest import predict

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
    return new, json.loads(run.stdout.strip().splitlines()[-1])


def test_two_replicas_on_two_logical_cpus(trained):
    _, result = trained
    assert result["replicas"] == 2
    assert len(result["devices"]) == 2
    assert result["devices"][0] != result["devices"][1]


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
