"""A file that would not load again is never published (`io.save_model`'s check).

`Fragile` stands in for a layer whose config does not round-trip (keras-hub's
ViT patch embedding inside a plain Functional model was the real case): each
save writes a config one generation older, and the third generation refuses
to be built. The original saves and loads; the loaded copy does not.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from regularize.cli import cli
from regularize.core import atomic
from regularize.core.errors import ModelSaveError
from regularize.keras3 import io


@keras.saving.register_keras_serializable(package="test_publish")
class Fragile(keras.layers.Layer):
    def __init__(self, generation=0, **kwargs):
        super().__init__(**kwargs)
        if generation >= 2:
            raise ValueError(f"Fragile cannot be rebuilt twice. Received: generation={generation}")
        self.generation = generation

    def call(self, x):
        return x * 2.0

    def get_config(self):
        return {**super().get_config(), "generation": self.generation + 1}


def _fragile_model():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, Fragile(name="fragile")(hidden), name="fragile_model")


def _core_model():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden), name="core")


def test_a_model_that_reloads_is_published(tmp_path):
    model = _fragile_model()
    x = np.ones((2, 4), "float32")
    path = io.save_model(model, tmp_path / "first.keras")
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model(x), reloaded(x))
    assert sorted(os.listdir(tmp_path)) == ["first.keras"]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_model_that_would_not_reload_is_refused(tmp_path, suffix):
    first = io.save_model(_fragile_model(), tmp_path / "first.keras")
    loaded = keras.saving.load_model(first)  # generation 1: saving it makes generation 2
    with pytest.raises(ModelSaveError) as info:
        io.save_model(loaded, tmp_path / f"second{suffix}")
    message = str(info.value)
    assert message.startswith(f"Cannot write model to '{tmp_path / f'second{suffix}'}': ")
    assert "class 'Fragile' cannot be rebuilt from its saved config" in message
    assert "Received: generation=2" in message
    assert "\n" not in message
    assert ".tmp" not in message
    assert sorted(os.listdir(tmp_path)) == ["first.keras"]  # no output, no temporary file


def test_an_existing_output_is_left_as_it_was(tmp_path):
    first = io.save_model(_fragile_model(), tmp_path / "first.keras")
    target = tmp_path / "target.keras"
    target.write_bytes(b"old")
    with pytest.raises(ModelSaveError, match="would not load again"):
        io.save_model(keras.saving.load_model(first), target, overwrite=True)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["first.keras", "target.keras"]


def test_the_cli_exits_1_with_one_line_and_no_file(tmp_path):
    source = io.save_model(_fragile_model(), tmp_path / "in.keras")
    out = tmp_path / "out.keras"
    # A class registered in this process is loaded only when named as a custom object.
    refused = CliRunner().invoke(cli, ["add-dropout", str(source), "-o", str(out)])
    assert refused.exit_code == 1, refused.output
    assert "names the class 'test_publish>Fragile'" in refused.stderr
    assert "pass its module in --custom-objects. If you trust the file" in refused.stderr
    args = ["add-dropout", str(source), "-o", str(out), "--custom-objects", __name__]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: Cannot write model to '{out}': ")
    assert "class 'Fragile'" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["in.keras"]


def test_core_layers_are_rebuilt_one_by_one(tmp_path):
    model = _core_model()
    path = io.save_model(model, tmp_path / "core.keras")
    io.check_reloads(model, path)  # the published file passes again
    # A core layer whose saved config Keras cannot take back.
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(parts["config.json"])
    config["config"]["layers"][2]["config"]["bogus"] = 1
    parts["config.json"] = json.dumps(config).encode()
    edited = tmp_path / "edited.keras"
    with zipfile.ZipFile(edited, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    with pytest.raises(ModelSaveError, match=r"class 'Dense' cannot be rebuilt .*bogus"):
        io.check_reloads(model, edited, shown=tmp_path / "shown.keras")


def test_core_config_detection():
    assert io._is_core(json.loads(_core_model().to_json()))
    assert not io._is_core(json.loads(_fragile_model().to_json()))


def test_write_file_check_stops_the_rename(tmp_path):
    target = tmp_path / "out.bin"

    def refuse(tmp):
        assert os.path.exists(tmp)
        raise ModelSaveError("refused")

    with pytest.raises(ModelSaveError, match="refused"):
        atomic.write_file(target, lambda tmp: open(tmp, "w").close(), check=refuse)
    assert os.listdir(tmp_path) == []
    atomic.write_file(target, lambda tmp: open(tmp, "w").close(), check=lambda tmp: None)
    assert os.listdir(tmp_path) == ["out.bin"]


# -- the Keras 2 engine: the same rule, checked in its child ---------------------------

KERAS2_FRAGILE = """
import tf_keras


class Fragile(tf_keras.layers.Layer):
    def __init__(self, generation=0, **kwargs):
        super().__init__(**kwargs)
        if generation >= 2:
            raise ValueError(f"Fragile cannot be rebuilt twice. Received: generation={generation}")
        self.generation = generation

    def call(self, x):
        return x * 2.0

    def get_config(self):
        return {**super().get_config(), "generation": self.generation + 1}
"""

BUILD_KERAS2_SAVEDMODEL = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, sys.argv[1])
import tf_keras
from fragile_layers import Fragile

inputs = tf_keras.Input((4,), name="x")
hidden = tf_keras.layers.Dense(8, activation="relu", name="d1")(inputs)
model = tf_keras.Model(inputs, Fragile(name="fragile")(hidden), name="fragile_model")
model.save(sys.argv[2], save_format="tf")
"""


@pytest.mark.slow
def test_the_keras2_engine_publishes_no_file_that_does_not_reload(tmp_path):
    """A SavedModel whose custom layer loads once but not twice: the rewrite's output is
    refused in one line, and neither it nor a temporary folder is left."""
    import subprocess
    import sys

    (tmp_path / "fragile_layers.py").write_text(KERAS2_FRAGILE)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    build = subprocess.run(
        [sys.executable, "-c", BUILD_KERAS2_SAVEDMODEL, str(tmp_path), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    before = sorted(p.name for p in tmp_path.iterdir())
    run = subprocess.run(
        [sys.executable, "-m", "regularize", "add-dropout", "model", "-o", "out"]
        + ["--custom-objects", "fragile_layers.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"Error: Cannot write model to {str(tmp_path / 'out')!r}: ")
    assert (
        ": the written file would not load again: class 'Fragile' cannot be rebuilt from its "
        "saved config (Fragile cannot be rebuilt twice. Received: generation=2); nothing was "
        "written."
    ) in lines[0]

    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no `out`, no temporary
