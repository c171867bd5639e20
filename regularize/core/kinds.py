"""Which engine reads an input, and where its output goes: no TensorFlow, no Keras.

Models saved by TensorFlow <= 2.15 are Keras 2 models. Keras 3 reads many of their
`.h5` files itself; `detect` tells apart the inputs only the Keras 2 engine
(`regularize.keras2`) reads, from the file's HDF5 attributes and config text, so the
service resolves the engine once without importing either adapter.
`keras3_fixes` is what Keras 3's `.h5` reader needs changed in a Keras 2 config
(`regularize.keras2.to_keras3` applies it for `--to-keras3`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from regularize.core import preset_folder
from regularize.core import safety
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.paths import PRESET
from regularize.core.paths import SAVE_SUFFIXES
from regularize.core.paths import check_output_path
from regularize.core.paths import output_format

EXPECTED = "a Keras 2 `.h5` file or a Keras 2 SavedModel folder"

SAVEDMODEL = "savedmodel"
KERAS2_H5 = "keras2-h5"
H5_SUFFIXES = (".h5", ".hdf5")

# Layer classes of tensorflow-model-optimization: Keras 3 has no tfmot, so a
# file holding them needs the Keras 2 engine and cannot become a `.keras`.
TFMOT_CLASSES = frozenset(
    {
        "PruneLowMagnitude",
        "QuantizeAnnotate",
        "QuantizeWrapper",
        "QuantizeWrapperV2",
        "QuantizeLayer",
        "ClusterWeights",
        "ClusterWeightsMHA",
    }
)
# Layer classes tf_keras 2.21 has and Keras 3 lacks (computed once by
# comparing `tf_keras.layers` with `keras.layers`; tf_keras no longer
# changes). `TFOpLambda` / `SlicingOpLambda` record a `tf.*` call or a
# slice in a Functional model: the commonest reason a Keras 2 `.h5` does not
# load in Keras 3.
KERAS2_ONLY_CLASSES = frozenset(
    {
        "TFOpLambda",
        "SlicingOpLambda",
        "DenseFeatures",
        "LocallyConnected1D",
        "LocallyConnected2D",
        "RandomFourierFeatures",
        "RandomHeight",
        "RandomWidth",
        "SyncBatchNormalization",
        "ThresholdedReLU",
        "DynamicEmbedding",
    }
)

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


def detect(path: str | os.PathLike) -> str | None:
    """Whether `path` needs the Keras 2 engine, without importing TensorFlow.

    Args:
        path: A model file or folder.

    Returns:
        "savedmodel" for a folder holding `saved_model.pb`; "keras2-h5" for an
        `.h5` file written by Keras 2 that Keras 3 cannot read: its config
        names a class Keras 3 does not have (tfmot wrappers, `TFOpLambda`,
        ...), holds an argument or a nested model Keras 3's `.h5` reader
        refuses (see `keras3_fixes`: LSTM's `time_major`, ...), or nests too
        deeply to parse (the Keras 2 engine's checks say so); None otherwise,
        including for the Keras 2 `.h5` files Keras 3 reads itself and for
        anything that is not a model (the Keras 3 loader says why). Class
        names are found in the config's text, so neither its depth nor the
        recursion limit decides the engine.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return SAVEDMODEL if (path / "saved_model.pb").is_file() else None
        if path.suffix not in H5_SUFFIXES or not path.is_file():
            return None
        version, text = h5_config_text(path)
    except Exception:  # not HDF5, corrupt, no config, bad name: the loader says why
        return None
    if version.startswith("3."):
        return None
    if safety.class_names(text) & (TFMOT_CLASSES | KERAS2_ONLY_CLASSES):
        return KERAS2_H5
    if safety.config_depth(text) > safety.MAX_CONFIG_DEPTH:
        return KERAS2_H5
    try:
        fixes, blockers = keras3_fixes(json.loads(text))
    except Exception:  # not JSON, or not a model config: the Keras 3 loader says why
        return None
    return KERAS2_H5 if fixes or blockers else None


def default_output(input: str | os.PathLike, suffix: str, *, to_keras3: bool = False) -> Path:
    """Where the rewritten model goes by default: beside the input, in its family.

    `model.h5` -> `model_<suffix>.h5`, `model/` -> `model_<suffix>/`, and with
    `to_keras3` -> `model_<suffix>.keras`.
    """
    input = Path(input)
    stem = input.name if input.is_dir() else input.stem
    if to_keras3:
        return input.with_name(f"{stem}_{suffix}.keras")
    if input.is_dir():
        return input.with_name(f"{stem}_{suffix}")
    return input.with_name(f"{stem}_{suffix}{input.suffix}")


def check_output(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    to_keras3: bool = False,
    keras2: bool | None = None,
) -> str:
    """Raises `ModelSaveError` if `output` may not be written for `input` (no TensorFlow).

    One rule for both engines (`regularize.core.paths`): the output is never the
    input or a folder that holds it, a link there is replaced and never
    followed, `overwrite` replaces only what the tool itself would write. For a
    Keras 2 input (`keras2`, by default `detect(input)`), an output ending in
    `.keras` means `to_keras3`; one ending in `.h5` is a Keras 2 HDF5 file; any
    other path is a SavedModel folder. A keras-hub preset in gives a preset folder
    out, unless the output is named as a `.keras` / `.h5` file.

    Returns:
        The output format: "keras", "h5" or "savedmodel".
    """
    output = Path(output)
    if not (detect(input) if keras2 is None else keras2):
        if preset_folder.is_preset(input) and output.suffix not in SAVE_SUFFIXES:
            check_output_path(output, overwrite=overwrite, source=Path(input), fmt=PRESET)
            return PRESET
        check_output_path(output, overwrite=overwrite, source=Path(input))
        return "keras"
    fmt = output_format(output)
    if to_keras3 and fmt != "keras":
        raise ModelSaveError(
            f"Cannot write model to {str(output)!r}: `to_keras3` writes a Keras 3 file. "
            f"Expected a path ending in `.keras`. Received: suffix={output.suffix!r}"
        )
    check_output_path(output, overwrite=overwrite, source=Path(input), fmt=fmt)
    return fmt


def h5_config_text(path: Path) -> tuple[str, str]:
    """The `keras_version` and the model config's JSON text of an HDF5 model file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs:
            raise ModelLoadError(
                "Cannot read model: the `.h5` file holds weights only, no model config. "
                f"Expected {EXPECTED}. Received: path={str(path)!r}"
            )
        config = f.attrs["model_config"]
        version = f.attrs.get("keras_version", "")
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    if isinstance(version, bytes):
        version = version.decode("utf-8")
    return str(version), str(config)
