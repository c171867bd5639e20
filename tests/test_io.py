"""Loading refuses bad input with one clear line; saving is atomic."""

from __future__ import annotations

import os
import zipfile

import h5py
import keras
import numpy as np
import pytest
from helpers import L
from helpers import assert_exact
from helpers import mlp_sequential

import regularize
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file") as info:
        regularize.load_model(tmp_path / "nope.keras")
    assert "Received: path=" in _one_line(info)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.keras"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty \(0 bytes\)") as info:
        regularize.load_model(path)
    _one_line(info)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=r"not a `.keras` archive") as info:
        regularize.load_model(path)
    _one_line(info)


def test_truncated_keras(saved_cnn, tmp_path):
    path = tmp_path / "cut.keras"
    data = saved_cnn.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a `.keras` archive") as info:
        regularize.load_model(path)
    _one_line(info)


def test_corrupt_member_in_keras(saved_cnn, tmp_path):
    path = tmp_path / "flipped.keras"
    data = bytearray(saved_cnn.read_bytes())
    with zipfile.ZipFile(saved_cnn) as archive:
        info = archive.getinfo("model.weights.h5")
    middle = info.header_offset + 200 + info.compress_size // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"corrupt `.keras` archive \(Bad CRC-32") as err:
        regularize.load_model(path)
    _one_line(err)


def test_zip_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="no `config.json`") as info:
        regularize.load_model(path)
    _one_line(info)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match="unsupported file type '.onnx'"):
        regularize.load_model(path)


def test_folder_and_savedmodel_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="it is a folder"):
        regularize.load_model(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="Keras 3 cannot load a SavedModel folder"):
        regularize.load_model(tmp_path)


def test_h5_random_bytes_and_weights_only(tmp_path):
    noise = tmp_path / "noise.h5"
    noise.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not an HDF5 file"):
        regularize.load_model(noise)
    weights = tmp_path / "model.weights.h5"
    mlp_sequential().model.save_weights(weights)
    with pytest.raises(ModelLoadError, match="holds weights only") as info:
        regularize.load_model(weights)
    _one_line(info)


def test_legacy_h5_model_loads(tmp_path):
    case = mlp_sequential()
    path = tmp_path / "model.h5"
    case.model.save(path)
    loaded = regularize.load_model(path)
    new = regularize.add_dropout(loaded, 0.3)
    assert_exact(case.model, new, case.x)


def test_lambda_refused_in_safe_mode(tmp_path):
    inp = keras.Input((3,))
    out = L.Lambda(lambda t: t * 2.0, name="double")(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(ModelLoadError, match="`safe_mode=False`") as info:
        regularize.load_model(path)
    _one_line(info)
    model = regularize.load_model(path, safe_mode=False)
    assert model.get_layer("double") is not None


CUSTOM = """
import keras

class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
"""


def test_custom_objects_from_file(tmp_path):
    module = tmp_path / "my_layers.py"
    module.write_text(CUSTOM)
    namespace = {}
    exec(compile(CUSTOM, str(module), "exec"), namespace)
    inp = keras.Input((3,))
    x = namespace["Scale"](3.0, name="scale")(L.Dense(3, activation="relu")(inp))
    path = tmp_path / "custom.keras"
    keras.Model(inp, x).save(path)
    with pytest.raises(ModelLoadError, match=r"'Scale'.*Pass `custom_objects`") as info:
        regularize.load_model(path)
    _one_line(info)
    model = regularize.load_model(path, custom_objects=module)
    assert type(model.get_layer("scale")).__name__ == "Scale"
    with pytest.raises(ModelLoadError, match="no such file"):
        regularize.load_model(path, custom_objects=tmp_path / "missing.py")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    case = mlp_sequential()
    target = tmp_path / "out.keras"

    def broken_save(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    with pytest.raises(ModelSaveError, match="No space left on device") as info:
        regularize.save_model(case.model, target)
    _one_line(info)
    assert os.listdir(tmp_path) == []


def test_save_refuses_existing_and_bad_paths(tmp_path):
    case = mlp_sequential()
    target = tmp_path / "out.keras"
    target.write_bytes(b"keep me")
    with pytest.raises(ModelSaveError, match="already exists"):
        regularize.save_model(case.model, target)
    assert target.read_bytes() == b"keep me"
    regularize.save_model(case.model, target, overwrite=True)
    assert zipfile.is_zipfile(target)
    with pytest.raises(ModelSaveError, match="Expected a path ending in `.keras` or `.h5`"):
        regularize.save_model(case.model, tmp_path / "out.pt")
    with pytest.raises(ModelSaveError, match="does not exist"):
        regularize.save_model(case.model, tmp_path / "missing" / "out.keras")
    assert sorted(os.listdir(tmp_path)) == ["out.keras"]


def test_saved_file_has_default_permissions(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"")
    path = regularize.save_model(mlp_sequential().model, tmp_path / "out.keras")
    assert oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


def test_load_compiles_without_building_the_optimizer(tmp_path):
    case = mlp_sequential()
    path = tmp_path / "compiled.keras"
    case.model.save(path)
    model = regularize.load_model(path)
    assert model.compiled
    assert model.get_compile_config()["loss"] == case.model.get_compile_config()["loss"]
    assert not model.optimizer.built  # no slot variables until fit()
    model.fit(case.x, np.array([0, 1]), epochs=1, verbose=0)
    assert model.optimizer.built


def test_save_h5_output(tmp_path):
    case = mlp_sequential()
    new = regularize.add_dropout(case.model, 0.3)
    path = regularize.save_model(new, tmp_path / "out.h5")
    assert h5py.is_hdf5(path)
    assert_exact(new, keras.models.load_model(path), case.x)
