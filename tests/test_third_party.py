"""Third-party Keras 2 networks from the package registry, through the real CLI.

`segmentation_models` (the `test` extra) builds a U-Net and an FPN on a
ResNet34 encoder (`encoder_weights=None`) with tf_keras, in a child process,
and saves them as `.h5`. Keras 3 reads those files itself, so `add-dropout`
rewrites them in this process: the output must predict bit for bit what Keras
3 reads from the input, reload with plain Keras and take a fit step, and the
command must warn that tf_keras's own predictions differ by float rounding
(its BatchNormalization is fused, Keras 3's is not; measured here). The
U-Net as a SavedModel goes through the Keras 2 engine, which is bit-exact
against tf_keras itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from regularize.core import terms

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
K2_ENV = dict(ENV, TF_USE_LEGACY_KERAS="1", SM_FRAMEWORK="tf.keras")
ARCHITECTURES = ("Unet", "FPN")

# Runs under tf_keras: builds both networks, saves them with an input and tf_keras's outputs.
_MAKE = """
import sys
from pathlib import Path
import numpy as np
import segmentation_models as sm
import tf_keras

out = Path(sys.argv[1])
x = np.random.default_rng(0).uniform(0, 1, size=(2, 64, 64, 3)).astype("float32")
np.save(out / "x.npy", x)
for name in sys.argv[2:]:
    tf_keras.utils.set_random_seed(0)
    model = getattr(sm, name)("resnet34", encoder_weights=None, input_shape=(64, 64, 3), classes=2)
    model.save(out / f"{name}.h5")
    np.save(out / f"{name}.y.npy", model(x, training=False).numpy())
    if name == "Unet":
        model.save(out / "unet_savedmodel", save_format="tf")
        tf_keras.utils.set_random_seed(0)
        # Any input size: the engine must probe it with a size the network accepts.
        anysize = sm.Unet("resnet34", encoder_weights=None, input_shape=(None, None, 3), classes=2)
        anysize.save(out / "unet_any_savedmodel", save_format="tf")
        np.save(out / "Unet_any.y.npy", anysize(x, training=False).numpy())
"""

# Runs under tf_keras: the Keras 2 engine's output against tf_keras's own outputs.
_CHECK = """
import json, sys
from pathlib import Path
import numpy as np
import tf_keras

out, source, reference = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
x, y = np.load(out / "x.npy"), np.load(out / reference)
new = tf_keras.models.load_model(out / f"{source}_dropout", compile=False)
got = new(x, training=False).numpy()
drops = sorted(type(l).__name__ for l in new.layers if "Dropout" in type(l).__name__)
print(json.dumps({"max": float(np.abs(got - y).max()), "drops": drops}))
"""


def _run(args, env, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("third_party")
    done = _run([sys.executable, "-c", _MAKE, str(folder), *ARCHITECTURES], K2_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_segmentation_models_h5_through_the_cli(built, name):
    source = built / f"{name}.h5"
    out = built / f"{name}_dropout.keras"
    x = np.load(built / "x.npy")
    reading = keras.models.load_model(source, compile=False)
    expected = np.asarray(reading(x, training=False))
    # What Keras 3 reads differs from tf_keras's predictions by float rounding only.
    tf_keras_says = np.load(built / f"{name}.y.npy")
    measured = float(np.abs(expected - tf_keras_says).max())
    assert measured < 1e-3  # measured: 3.3e-5 (Unet), 1.0e-4 (FPN)

    run = _run(
        [sys.executable, "-m", "regularize", "add-dropout", str(source), "--rate", "0.2"]
        + ["--drop-path", "0.1", "-o", str(out), "-q"],
        ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Warning: {terms.KERAS2_BATCHNORM}" in run.stderr.splitlines()
    new = keras.models.load_model(out)
    kinds = [type(layer).__name__ for layer in new.layers if layer.name.endswith("__dropout")]
    paths = [layer for layer in new.layers if layer.name.endswith("__droppath")]
    assert kinds and set(kinds) == {"SpatialDropout2D"}
    assert len(paths) == 16  # the ResNet34 encoder's 16 residual blocks
    assert new.count_params() == reading.count_params()
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)
    new.compile(optimizer="sgd", loss="binary_crossentropy")
    before = [np.asarray(w) for w in new.trainable_weights]
    new.fit(x, (expected > 0.5).astype("float32"), epochs=1, batch_size=2, verbose=0)
    after = [np.asarray(w) for w in new.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_segmentation_models_savedmodel_through_the_keras2_engine(built):
    source = built / "unet_savedmodel"
    run = _run(
        [sys.executable, "-m", "regularize", "add-dropout", str(source), "--rate", "0.2"]
        + ["--drop-path", "0.1", "-q"],
        ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""  # the Keras 2 engine: tf_keras on both sides, no warning
    found = _check(built, "unet_savedmodel", "Unet.y.npy")
    assert found["max"] == 0.0
    assert found["drops"].count("Dropout") == 16  # the drop paths
    assert "SpatialDropout2D" in found["drops"]


def test_any_size_unet_is_probed_with_a_size_it_accepts(built):
    """A U-Net on `(None, None, 3)` fails on 4x4 probes (it halves five times): the engine
    probes it with the first size it accepts instead of failing with an internal error."""
    source = built / "unet_any_savedmodel"
    run = _run(
        [sys.executable, "-m", "regularize", "add-dropout", str(source), "--rate", "0.2", "-q"],
        ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = _check(built, "unet_any_savedmodel", "Unet_any.y.npy")
    assert found["max"] == 0.0
    assert "SpatialDropout2D" in found["drops"]


def _check(built: Path, source: str, reference: str) -> dict:
    done = _run([sys.executable, "-c", _CHECK, str(built), source, reference], K2_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
