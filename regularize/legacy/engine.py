"""The Keras 2 engine, child side: one request in, one result out.

Runs only under `TF_USE_LEGACY_KERAS=1` (see `regularize.legacy`), imports
tf_keras and, for wrapped models, tensorflow-model-optimization. Loads the
model (inside tfmot's scopes and the user's custom objects), rewrites it
(`regularize.legacy.rewrite`), checks that inference is unchanged, and saves
it atomically in the input's family: `.h5` file or SavedModel folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

# Must precede the TensorFlow import: it decides what `tf.keras` is, for this
# module and for the user's custom-object modules.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

# No public name: tf_keras' `load_model(safe_mode=...)` only reaches `.keras`
# files, this scope reaches the `.h5` and SavedModel loaders too.
from tf_keras.src.saving.serialization_lib import SafeModeScope  # noqa: E402

from regularize.custom_objects import load as load_custom_objects  # noqa: E402
from regularize.errors import ModelLoadError  # noqa: E402
from regularize.errors import ModelSaveError  # noqa: E402
from regularize.errors import PolicyError  # noqa: E402
from regularize.errors import UnsupportedModelError  # noqa: E402
from regularize.errors import first_line as _first_line  # noqa: E402
from regularize.legacy import TFMOT_CLASSES  # noqa: E402
from regularize.legacy import refuse_keras3  # noqa: E402
from regularize.legacy.keras3 import compare_outputs  # noqa: E402
from regularize.legacy.rewrite import ADD  # noqa: E402
from regularize.legacy.rewrite import PLAN  # noqa: E402
from regularize.legacy.rewrite import STRIP  # noqa: E402
from regularize.legacy.rewrite import Run  # noqa: E402
from regularize.legacy.rewrite import all_layers  # noqa: E402
from regularize.legacy.rewrite import class_name  # noqa: E402
from regularize.legacy.rewrite import rewrite  # noqa: E402
from regularize.policy import Policy  # noqa: E402

EXPECTED = "a Keras 2 `.h5` file or a Keras 2 SavedModel folder"


# -- requests -------------------------------------------------------------


def handle(request: dict) -> dict:
    """Runs one request (see `regularize.legacy.run`); returns the result dict."""
    mode = ADD if request["mode"] == PLAN else request["mode"]
    dry = bool(request.get("dry_run")) or request["mode"] == PLAN
    source = Path(request["input"])
    policy = _policy(request.get("policy") or {}, mode, request.get("policy_source") or "")
    model = load(source, request.get("custom_objects"), safe_mode=request.get("safe_mode", True))
    if request.get("to_keras3") and not dry:
        refuse_keras3({class_name(layer) for layer in all_layers(model)})
    run = Run(policy=policy, mode=mode, build=not dry)
    new = rewrite(model, run)
    result = {"sites": run.sites, "warnings": run.warnings, "output": None}
    if new is None:
        return result
    inputs = sample_inputs(model)
    expected = check_inference(model, new, inputs, run)
    output = Path(request["output"])
    save(new, output, overwrite=bool(request.get("overwrite")))
    if request.get("reference"):
        arrays = {f"input_{i}": x for i, x in enumerate(inputs)}
        arrays.update({f"output_{i}": y for i, y in enumerate(expected)})
        np.savez(request["reference"], n_inputs=len(inputs), n_outputs=len(expected), **arrays)
    result["output"] = str(output)
    return result


def _policy(data: dict, mode: str, source: str) -> Policy:
    """The request's policy; `strip` needs none (as `remove_dropout`)."""
    if mode == STRIP:
        return Policy(rate=0.0)
    policy = Policy.from_dict(data, source=source)
    if policy.mc:
        # The MC layers (regularize.mc) are Keras 3 classes; a Keras 2 file
        # holding tf_keras twins of them would need this package to load.
        raise PolicyError(
            "MC dropout is not available for Keras 2 models. Expected mc=false "
            "(drop --mc), or convert the model to Keras 3 first. Received: mc=True"
        )
    return policy


# -- loading --------------------------------------------------------------


def load(path: Path, custom_objects, *, safe_mode: bool = True) -> tf_keras.Model:
    """Loads a Keras 2 `.h5` file or SavedModel folder with tf_keras.

    `safe_mode` refuses Python-lambda `Lambda` layers, as the Keras 3 path
    does: tf_keras' own `.h5` loader would run their bytecode unasked.
    """
    objects = load_custom_objects(custom_objects)
    received = f"Received: path={str(path)!r}"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tf_keras.utils.custom_object_scope(objects))
            stack.enter_context(SafeModeScope(safe_mode))
            if _mentions(path, TFMOT_CLASSES):
                for scope in _tfmot_scopes():
                    stack.enter_context(scope)
            model = tf_keras.models.load_model(str(path), compile=True)
    except Exception as err:  # tf_keras raises many types; one line each here
        raise ModelLoadError(_explain_load_error(err, received)) from err
    if not isinstance(model, tf_keras.Model):
        raise ModelLoadError(
            f"Cannot read model: it holds a {type(model).__name__}, not a Keras model. "
            f"Expected {EXPECTED}. {received}"
        )
    for layer in all_layers(model):
        # A SavedModel revives a layer whose class is unknown here from its
        # traced functions: it runs, but its config is gone, so the model
        # could not be saved again.
        if type(layer).__module__.startswith("tf_keras.src.saving.legacy.saved_model"):
            raise ModelLoadError(_missing_class(type(layer).__name__, received))
    return model


def _mentions(path: Path, names) -> bool:
    """Whether the saved config names one of `names` (cheap: no tfmot import otherwise)."""
    if path.is_dir():
        data = (path / "keras_metadata.pb").read_bytes()
    else:
        import h5py

        with h5py.File(path, "r") as f:
            data = f.attrs.get("model_config", "")
        data = data if isinstance(data, bytes) else str(data).encode()
    return any(f'"{name}"'.encode() in data for name in names)


def _tfmot_scopes() -> list:
    import tensorflow_model_optimization as tfmot

    return [
        tfmot.sparsity.keras.prune_scope(),
        tfmot.quantization.keras.quantize_scope(),
        tfmot.clustering.keras.cluster_scope(),
    ]


# tf_keras: "Unknown layer: 'Scale'. Please ensure ..." (also object, loss, ...).
_UNKNOWN = re.compile(r"Unknown (?:layer|object|class|loss|metric|activation)[^:]*: '?([\w.>]+)")


def _explain_load_error(err: Exception, received: str) -> str:
    text = str(err)
    if "safe_mode" in text:
        return (
            "Refusing to load a model with a Python-lambda `Lambda` layer: it runs "
            "arbitrary code. If you trust the file, pass --unsafe "
            f"(safe_mode=False). {received}"
        )
    match = _UNKNOWN.search(text)
    if match:
        return _missing_class(match.group(1), received)
    if "SavedModel file does not exist" in text or "saved_model.pb" in text:
        return f"Cannot read model: not a SavedModel. Expected {EXPECTED}. {received}"
    return f"Cannot read model: {type(err).__name__}: {_first_line(err)}. {received}"


def _missing_class(name: str, received: str) -> str:
    return (
        f"Cannot read model: it uses the custom object {name!r}, which is not defined "
        "here. Pass --custom-objects with the module or `.py` file that defines it "
        f"(custom_objects=...). {received}"
    )


# -- inference check ------------------------------------------------------


def sample_inputs(model, seed: int = 0) -> list[np.ndarray]:
    """A fixed random batch of two for each model input."""
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = [2] + [d if d is not None else 4 for d in tensor.shape[1:]]
        dtype = tensor.dtype
        if dtype.is_integer:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_bool:
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            arrays.append(rng.normal(size=shape).astype(dtype.as_numpy_dtype))
    return arrays


def check_inference(old, new, inputs, run: Run) -> list[np.ndarray]:
    """Raises unless `new` predicts what `old` does (training=False).

    Returns:
        The new model's outputs (the reference for a Keras 3 conversion).
    """
    feed = tf.nest.pack_sequence_as(old._nested_inputs, inputs)
    expected = [np.asarray(t) for t in tf.nest.flatten(old(feed, training=False))]
    got = [np.asarray(t) for t in tf.nest.flatten(new(feed, training=False))]
    worst, close = compare_outputs(expected, got)
    if worst == 0 or (close and run.rebuilt_lstm):  # rules.LSTM_KERNEL warned about this
        return got
    raise UnsupportedModelError(
        "Refusing to write the rewritten model: its inference differs from the "
        f"input's (max abs difference {worst:.3g}). Expected equal outputs with "
        "training=False. Please report this model."
    )


# -- saving ---------------------------------------------------------------


def save(model, output: Path, *, overwrite: bool) -> None:
    """Saves atomically beside `output`: `.h5` as a file, anything else as a SavedModel."""
    if output.exists() and not overwrite:
        raise ModelSaveError(
            f"Cannot write model to {str(output)!r}: it already exists. "
            "Pass --force (overwrite=True in Python) to replace it."
        )
    h5 = output.suffix in (".h5", ".hdf5")
    try:
        if h5:
            _save_h5(model, output)
        else:
            _save_savedmodel(model, output)
    except ModelSaveError:
        raise
    except Exception as err:
        raise ModelSaveError(f"Cannot write model to {str(output)!r}: {_first_line(err)}") from err


def _save_h5(model, output: Path) -> None:
    fd, tmp = tempfile.mkstemp(
        prefix=f".{output.stem}.", suffix=".tmp" + output.suffix, dir=output.parent
    )
    os.close(fd)
    try:
        model.save(tmp, save_format="h5")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_savedmodel(model, output: Path) -> None:
    """Writes the folder under a temporary name, then renames it into place.

    A folder cannot be swapped in one step over an existing one: the old one
    is moved aside first and removed once the new one is in place.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    old = None
    try:
        model.save(str(tmp), save_format="tf")
        os.chmod(tmp, 0o777 & ~_umask())
        if output.exists():
            old = output.with_name(f".{output.name}.{os.getpid()}.old")
            os.rename(output, old)
        os.rename(tmp, output)
    except BaseException:
        if old is not None and not output.exists():
            os.rename(old, output)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
