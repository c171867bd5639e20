"""Keras 2 `.h5` -> Keras 3: config fixes, the checked conversion. No TensorFlow import.

Keras 3 reads Keras 2 `.h5` files with its own legacy loader, which refuses a
few arguments tf_keras writes and numbers nested-model calls differently.
`keras3_fixes` patches a config for it (`regularize.legacy.detect` uses it to
tell which files Keras 3 cannot read); `convert` is the last step of
`--to-keras3`, run in the parent process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from regularize.errors import ModelLoadError
from regularize.errors import UnsupportedModelError

_SPATIAL = ("SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")
_RNNS = ("LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "RNN")
_GROUPED = (
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
)
_RANDOM = (
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomCrop",
    "RandomBrightness",
)
_ANY = object()
# Config keys that tf_keras writes and Keras 3 (3.15) refuses as unknown
# arguments, with the values under which dropping them changes nothing (the
# Keras 3 behaviour). Found by saving each tf_keras 2.21 layer to `.h5` and
# loading it with Keras 3. Any other value blocks the conversion.
_KERAS3_DROPS = (
    (_SPATIAL, "trainable", _ANY),  # dropout has no weights to freeze
    (_SPATIAL, "noise_shape", (None,)),
    (_RNNS, "time_major", (False,)),
    (_GROUPED, "groups", (1,)),
    (("SeparableConv1D", "SeparableConv2D"), "kernel_initializer", _ANY),  # unused by
    (("SeparableConv1D", "SeparableConv2D"), "kernel_regularizer", _ANY),  # separable
    (("SeparableConv1D", "SeparableConv2D"), "kernel_constraint", _ANY),  # convolutions
    (_RANDOM, "rng_type", _ANY),
)
# Layers whose Keras 2 `.h5` config Keras 3 cannot turn back into the same
# layer: MultiHeadAttention is not rebuilt from its saved shapes, and
# ConvLSTM loads but computes other values (max difference 0.03 on a test).
_KERAS3_BLOCKED = {
    "MultiHeadAttention": "Keras 3 cannot rebuild it from a Keras 2 `.h5` config",
    "ConvLSTM1D": "Keras 3 computes it differently from Keras 2",
    "ConvLSTM2D": "Keras 3 computes it differently from Keras 2",
    "ConvLSTM3D": "Keras 3 computes it differently from Keras 2",
}


def keras3_fixes(config: dict) -> tuple[list[str], list[str]]:
    """Edits a Keras 2 model config in place so that Keras 3 can read it.

    Keras 3's `.h5` reader refuses a few arguments tf_keras writes (see
    `_KERAS3_DROPS`), and it counts a nested model's calls from 0 where Keras
    2 counts from 1 (a Keras 2 model's node 0 is its own graph).

    Returns:
        `(fixes, blockers)`: what was changed, and what cannot be (a value
        Keras 3 has no equivalent for), one short text each.
    """
    fixes: list[str] = []
    blockers: list[str] = []
    _fix_config(config, fixes, blockers)
    return fixes, blockers


def _fix_config(node, fixes: list, blockers: list) -> None:
    if isinstance(node, list):
        for value in node:
            _fix_config(value, fixes, blockers)
        return
    if not isinstance(node, dict):
        return
    name = node.get("class_name")
    config = node.get("config")
    if isinstance(config, dict) and isinstance(name, str):
        where = config.get("name", name)
        if name in _KERAS3_BLOCKED:
            blockers.append(f"{where} ({name}): {_KERAS3_BLOCKED[name]}")
        for classes, key, allowed in _KERAS3_DROPS:
            if name in classes and key in config:
                if allowed is _ANY or config[key] in allowed:
                    del config[key]
                    fixes.append(f"{where}: dropped `{key}`")
                else:
                    blockers.append(f"{where}: `{key}={config[key]!r}` has no Keras 3 equivalent")
        if isinstance(config.get("layers"), list):
            _renumber_nested_calls(config, fixes)
    for value in node.values():
        _fix_config(value, fixes, blockers)


def _renumber_nested_calls(config: dict, fixes: list) -> None:
    """Keras 2 node indices of nested models, shifted down by one for Keras 3."""
    models = {
        layer.get("config", {}).get("name")
        for layer in config["layers"]
        if isinstance(layer, dict) and isinstance(layer.get("config", {}).get("layers"), list)
    }
    refs = []  # mutable [name, node_index, tensor_index, ...] lists
    for layer in config["layers"]:
        calls = layer.get("inbound_nodes") if isinstance(layer, dict) else None
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, list):
                refs.extend(r for r in call if isinstance(r, list))
    for key in ("input_layers", "output_layers"):
        value = config.get(key)
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = [value]
        refs.extend(value or [])
    for model in models - {None}:
        mine = [r for r in refs if len(r) >= 2 and r[0] == model and isinstance(r[1], int)]
        if mine and min(r[1] for r in mine) >= 1:
            for r in mine:
                r[1] -= 1
            fixes.append(f"{model}: nested-model call indices shifted for Keras 3")


def make_keras3_readable(h5: str | os.PathLike) -> list[str]:
    """Applies `keras3_fixes` to the model config of the `.h5` file, in place.

    Raises:
        UnsupportedModelError: A setting has no Keras 3 equivalent.
    """
    import h5py

    with h5py.File(h5, "r") as f:
        config = f.attrs["model_config"]
    config = json.loads(config.decode("utf-8") if isinstance(config, bytes) else config)
    fixes, blockers = keras3_fixes(config)
    if blockers:
        raise UnsupportedModelError(
            f"Cannot convert to Keras 3: {blockers[0]}. Set `to_keras3=False` to keep a "
            "Keras 2 file."
        )
    if fixes:
        with h5py.File(h5, "r+") as f:
            f.attrs["model_config"] = json.dumps(config)
    return fixes


def convert(
    h5: Path, reference: Path, output: Path, *, custom_objects=None, overwrite: bool = False
) -> list[str]:
    """Turns the engine's Keras 2 `.h5` into a Keras 3 `.keras` file, checked.

    Fixes the config for Keras 3, loads it with Keras 3 (here, in the parent
    process), compares its inference with the engine's outputs in
    `reference` (an `.npz`: `input_<i>`, `output_<i>`), and saves `output`
    atomically with `regularize.io.save_model`.

    Returns:
        Warnings for the report.

    Raises:
        UnsupportedModelError: Keras 3 cannot hold the model, or it computes
            other outputs.
    """
    import keras
    import numpy as np

    from regularize import io

    notes = []
    spec = custom_objects
    make_keras3_readable(h5)
    try:
        model = io.load_model(h5, custom_objects=spec, compile=True)
    except ModelLoadError:
        # Keras 3 may not read a Keras 2 compile config (a tf_keras-only loss,
        # metric or optimizer); the weights and graph are what matter.
        model = io.load_model(h5, custom_objects=spec, compile=False)
        notes.append(
            "the compile config did not load in Keras 3: the `.keras` model is not compiled"
        )
    data = np.load(reference)
    inputs = [data[f"input_{i}"] for i in range(int(data["n_inputs"]))]
    expected = [data[f"output_{i}"] for i in range(int(data["n_outputs"]))]
    # The structure the Keras 3 model was built with (a list of one for many
    # Keras 2 files), so that Keras does not warn about it.
    outputs = model(keras.tree.pack_sequence_as(model._inputs_struct, inputs), training=False)
    # keras.tree and tf.nest flatten alike (dicts by sorted key).
    got = [np.asarray(t) for t in keras.tree.flatten(outputs)]
    worst, close = compare_outputs(expected, got)
    if worst == float("inf"):
        raise UnsupportedModelError(
            "Cannot convert to Keras 3: the Keras 3 model's outputs do not match the "
            f"Keras 2 model's. Expected shapes {[e.shape for e in expected]}. "
            f"Received: {[g.shape for g in got]}"
        )
    if worst > 0:
        # Keras 3 and tf_keras compute a few layers with different kernels
        # (LayerNormalization: 1e-7 apart on a test), so float rounding may
        # differ; anything larger is a conversion error.
        if not close:
            raise UnsupportedModelError(
                "Cannot convert to Keras 3: inference differs from the Keras 2 model "
                f"(max abs difference {worst:.3g}). Expected equal outputs. Set "
                "`to_keras3=False` to keep a Keras 2 file."
            )
        notes.append(
            "Keras 3 computes some layers with other kernels than Keras 2: inference "
            f"differs from the Keras 2 model by float rounding (max {worst:.2g})"
        )
    io.save_model(model, output, overwrite=overwrite)
    return notes


def compare_outputs(expected: list, got: list) -> tuple[float, bool]:
    """Largest absolute difference of two output lists, and whether all are close.

    Returns `(inf, False)` when the lists differ in length or shapes.
    """
    import numpy as np

    if len(expected) != len(got) or any(
        np.shape(a) != np.shape(b) for a, b in zip(expected, got, strict=True)
    ):
        return float("inf"), False
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(expected, got, strict=True)]
    worst = max((float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs), default=0.0)
    close = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs)
    return worst, close
