"""Keras 2 `.h5` -> Keras 3: config fixes, the checked conversion. No TensorFlow import.

Keras 3 reads Keras 2 `.h5` files with its own legacy loader, which refuses a
few arguments tf_keras writes and numbers nested-model calls differently.
`keras3_fixes` patches a config for it (`regularize.keras2.detect` uses it to
tell which files Keras 3 cannot read); `convert` is the last step of
`--to-keras3`, run in the parent process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from regularize.core.errors import ModelLoadError
from regularize.core.errors import UnsupportedModelError
from regularize.core.kinds import keras3_fixes


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
    atomically with `regularize.keras3.io.save_model`.

    Returns:
        Warnings for the report.

    Raises:
        UnsupportedModelError: Keras 3 cannot hold the model, or it computes
            other outputs.
    """
    import keras
    import numpy as np

    from regularize.keras3 import io

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
