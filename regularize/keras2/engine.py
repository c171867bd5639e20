"""The Keras 2 engine, child side: one request in, one result out.

Runs only under `TF_USE_LEGACY_KERAS=1` (see `regularize.keras2`), imports
tf_keras and, for wrapped models, tensorflow-model-optimization. Loads the
model (inside tfmot's scopes and the user's custom objects), rewrites it
(`regularize.keras2.rewrite`), checks that inference is unchanged, and saves
it atomically in the input's family: `.h5` file or SavedModel folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

# Must precede the TensorFlow import: it decides what `tf.keras` is, for this
# module and for the user's custom-object modules.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

# No public name: tf_keras' `load_model(safe_mode=...)` only reaches `.keras`
# files, this scope reaches the `.h5` and SavedModel loaders too.
from tf_keras.src.saving.legacy import saving_utils  # noqa: E402
from tf_keras.src.saving.legacy.saved_model import json_utils  # noqa: E402
from tf_keras.src.saving.legacy.saved_model import utils as saved_model_utils  # noqa: E402
from tf_keras.src.saving.serialization_lib import SafeModeScope  # noqa: E402

from regularize.core import atomic  # noqa: E402
from regularize.core import budget
from regularize.core import checker  # noqa: E402
from regularize.core import inputs  # noqa: E402
from regularize.core import safety  # noqa: E402
from regularize.core import terms  # noqa: E402
from regularize.core.custom_objects import load as load_custom_objects  # noqa: E402
from regularize.core.errors import ModelLoadError  # noqa: E402
from regularize.core.errors import ModelSaveError  # noqa: E402
from regularize.core.errors import PolicyError  # noqa: E402
from regularize.core.errors import RegularizeError  # noqa: E402
from regularize.core.errors import UnsupportedModelError  # noqa: E402
from regularize.core.errors import first_line as _first_line  # noqa: E402
from regularize.core.policy import Policy  # noqa: E402
from regularize.keras2 import TFMOT_CLASSES  # noqa: E402
from regularize.keras2 import check_model_file  # noqa: E402
from regularize.keras2 import refuse_keras3  # noqa: E402
from regularize.keras2.protocol import Job  # noqa: E402
from regularize.keras2.protocol import Result  # noqa: E402
from regularize.keras2.rewrite import STRIP  # noqa: E402
from regularize.keras2.rewrite import all_layers  # noqa: E402
from regularize.keras2.rewrite import class_name  # noqa: E402
from regularize.keras2.rewrite import rewrite  # noqa: E402
from regularize.keras2.to_keras3 import compare_outputs  # noqa: E402

EXPECTED = "a Keras 2 `.h5` file or a Keras 2 SavedModel folder"


# -- requests -------------------------------------------------------------


def handle(job: Job) -> Result:
    """Runs one job (see `regularize.keras2.run`)."""
    policy = _policy(job.policy, job.mode, job.policy_source)
    model = load(
        Path(job.input),
        job.custom_objects,
        safe_mode=job.safe_mode,
        custom_path=job.custom_path,
    )
    if job.to_keras3 and not job.dry_run:
        refuse_keras3({class_name(layer) for layer in all_layers(model)})
    done = rewrite(model, policy, mode=job.mode, build=not job.dry_run)
    sites = [dataclasses.asdict(site) for site in done.sites]
    new = done.model
    if new is None:
        return Result(sites, list(done.warnings))
    inputs = probe_inputs(model)
    # The walk warns when it rebuilds an LSTM with recurrent dropout.
    expected = check_inference(model, new, inputs, lstm_rebuilt=terms.LSTM_KERNEL in done.warnings)
    output = Path(job.output)
    save(new, output, overwrite=job.overwrite)
    if job.reference:
        arrays = {f"input_{i}": x for i, x in enumerate(inputs)}
        arrays.update({f"output_{i}": y for i, y in enumerate(expected)})
        np.savez(job.reference, n_inputs=len(inputs), n_outputs=len(expected), **arrays)
    return Result(sites, list(done.warnings), str(output))


def _policy(data: dict, mode: str, source: str) -> Policy:
    """The request's policy; `strip` needs none (as `remove_dropout`)."""
    if mode == STRIP:
        return Policy(rate=0.0)
    policy = Policy.from_dict(data, source=source)
    if policy.mc:
        # The MC layers (regularize.mc) are Keras 3 classes; a Keras 2 file
        # holding tf_keras twins of them would need this package to load.
        raise PolicyError(
            "MC dropout is not available for Keras 2 models. Expected `mc=False`, "
            "or convert the model to Keras 3 first. Received: mc=True"
        )
    return policy


# -- loading --------------------------------------------------------------


def load(
    path: Path, custom_objects, *, safe_mode: bool = True, custom_path: str | None = None
) -> tf_keras.Model:
    """Loads a Keras 2 `.h5` file or SavedModel folder with tf_keras.

    The file is checked as data first (`regularize.keras2.check_model_file`).
    With `safe_mode`, Python-lambda `Lambda` layers are refused, as on the
    Keras 3 path (tf_keras' own `.h5` loader would run their bytecode
    unasked), and a SavedModel is rebuilt from its Keras config and its
    variables (`_load_savedmodel`) instead of being restored by TensorFlow's
    loader, which runs the SavedModel's own graph functions.

    Args:
        custom_path: The folder of a custom-object module named by the user
            (this process starts without the working folder on its path).
    """
    wrapped = _mentions(path, TFMOT_CLASSES)
    modules = _tfmot_modules() if wrapped else frozenset()
    check_model_file(path, unsafe=not safe_mode, custom_objects=custom_objects, modules=modules)
    if custom_path and custom_path not in sys.path:
        sys.path.append(custom_path)  # last: it shadows nothing installed
    objects = load_custom_objects(custom_objects)
    received = f"Received: path={str(path)!r}"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tf_keras.utils.custom_object_scope(objects))
            stack.enter_context(SafeModeScope(safe_mode))
            if wrapped:
                for scope in _tfmot_scopes():
                    stack.enter_context(scope)
            _check_weight_budget(path, received)
            if path.is_dir() and safe_mode:
                model = _load_savedmodel(path)
            else:
                model = tf_keras.models.load_model(str(path), compile=True)
    except RegularizeError:
        raise
    except Exception as err:  # tf_keras raises many types; one line each here
        raise ModelLoadError(_explain_load_error(err, received)) from err
    inputs.check_is_model(
        model, tf_keras.Model, what="it", noun="a Keras model", expected=EXPECTED, received=received
    )
    for layer in all_layers(model):
        # A SavedModel revives a layer whose class is unknown here from its
        # traced functions: it runs, but its config is gone, so the model
        # could not be saved again.
        if type(layer).__module__.startswith("tf_keras.src.saving.legacy.saved_model"):
            raise ModelLoadError(_missing_class(type(layer).__name__, received))
    return model


def _load_savedmodel(path: Path) -> tf_keras.Model:
    """A Keras 2 SavedModel rebuilt from its Keras config, with its variables read as data.

    `tf_keras.models.load_model` restores the SavedModel's object graph, and
    that runs graph functions stored in the file (a tracked resource's
    initializer can write or copy any file). Here the model is built from
    the config in `keras_metadata.pb` (checked by `regularize.core.safety`), and
    its variables are read from the `variables/` checkpoint, which restores
    tensors and runs nothing from the file. The compile config is applied
    as the `.h5` loader does it.
    """
    metadata = json_utils.decode(safety.savedmodel_root_config(path)[1])
    config = {"class_name": metadata["class_name"], "config": metadata["config"]}
    # tf_keras' own SavedModel-loading scope: the legacy deserializer, which
    # resolves names in Keras' registries and never imports a config's
    # `module` (outside it, TensorFlow's embedded old Keras would be asked).
    with saved_model_utils.keras_option_scope(save_traces=False, in_tf_saved_model_scope=True):
        model = tf_keras.models.model_from_config(config)
    shape = metadata.get("build_input_shape")
    if not model.built and shape is not None:
        model.build(shape)
    status = model.load_weights(str(path / "variables" / "variables"))
    try:
        # Every variable the rebuilt model has must come from the checkpoint.
        status.assert_existing_objects_matched()
    except AssertionError as err:
        raise ModelLoadError(
            "Cannot read model: the SavedModel's variables do not fit its Keras config "
            f"({_first_line(err)[:200]}). Received: path={str(path)!r}"
        ) from err
    training_config = metadata.get("training_config")
    if training_config is not None:
        model.compile(
            **saving_utils.compile_args_from_training_config(training_config),
            from_serialized=True,
        )
        saving_utils.try_build_compiled_arguments(model)
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


def _tfmot_modules() -> frozenset[str]:
    """The modules tfmot's serializable classes live in, exactly (its configs name them)."""
    modules = set()
    for scope in _tfmot_scopes():
        objects = getattr(scope, "custom_objects", ())  # a tuple of the dicts it was given
        for table in objects if isinstance(objects, tuple | list) else (objects,):
            for obj in table.values():
                if hasattr(obj, "__module__"):
                    modules.add(obj.__module__)
    return frozenset(modules)


def _check_weight_budget(path: Path, received: str) -> None:
    """Refuses a config whose weights are far more than the file stores (see the core).

    The model is built from its config inside a `tf.Graph`: tf_keras then
    creates each variable as a graph node with its shape and allocates
    nothing until a session would run its initializer, which never happens.
    The variables are read from the graph's nodes, so that a build that
    fails halfway (tfmot's pruning masks overflow on a huge kernel) still
    counts what it had declared.
    """
    try:
        if path.is_dir():
            metadata = json_utils.decode(safety.savedmodel_root_config(path)[1])
            config = {"class_name": metadata["class_name"], "config": metadata["config"]}
            stored = sum(f.stat().st_size for f in (path / "variables").glob("variables.data-*"))
        else:
            config = json_utils.decode(_h5_text(path))
            stored = safety.h5_dataset_bytes(path)
    except Exception:  # not readable so: the real load says why
        return
    graph = tf.Graph()
    with contextlib.suppress(Exception), graph.as_default():
        with saved_model_utils.keras_option_scope(save_traces=False, in_tf_saved_model_scope=True):
            tf_keras.models.model_from_config(config)
    sizes: dict[str, int] = {}
    for op in graph.get_operations():
        if op.type in ("VarHandleOp", "VariableV2"):
            shape = tf.TensorShape(op.get_attr("shape"))
            dtype = tf.as_dtype(op.get_attr("dtype"))
            size = dtype.size
            for dim in shape.as_list() if shape.rank is not None else []:
                size *= dim if dim is not None and dim > 0 else 1
            layer = op.name.split("/")[0]
            sizes[layer] = sizes.get(layer, 0) + size
    layers = [budget.LayerWeights(name, _class_of(config, name), n) for name, n in sizes.items()]
    budget.check_weight_budget(
        layers, stored=stored, available=budget.available_memory(), received=received
    )


def _class_of(config, name: str) -> str:
    for node in checker.dicts(config):
        inner = node.get("config")
        if isinstance(inner, dict) and inner.get("name") == name:
            return str(node.get("class_name"))
    return "?"


def _h5_text(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        text = f.attrs["model_config"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


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
    refusal = safety.safe_mode_refusal(text, received)
    if refusal:
        return refusal
    match = _UNKNOWN.search(text)
    if match:
        return _missing_class(match.group(1), received)
    if "SavedModel file does not exist" in text or "saved_model.pb" in text:
        return f"Cannot read model: not a SavedModel. Expected {EXPECTED}. {received}"
    return f"Cannot read model: {type(err).__name__}: {_first_line(err)}. {received}"


def _missing_class(name: str, received: str) -> str:
    return (
        f"Cannot read model: it uses the custom object {name!r}, which is not defined "
        "here. Pass `custom_objects`: the module or `.py` file that defines it. "
        f"{received}"
    )


# -- inference check ------------------------------------------------------


# Sizes tried for an input's unknown dimensions: a U-Net on `(None, None, 3)`
# needs multiples of 32, a classifier with a Flatten a fixed size.
_PROBE_SIZES = (4, 32, 64, 224)


def probe_inputs(model) -> list[np.ndarray]:
    """`sample_inputs` with the first size of unknown dimensions the model accepts."""
    feed_of = lambda arrays: tf.nest.pack_sequence_as(model._nested_inputs, arrays)  # noqa: E731
    for size in _PROBE_SIZES[:-1]:
        arrays = sample_inputs(model, size=size)
        if all(d is not None for t in model.inputs for d in t.shape[1:]):
            return arrays
        try:
            model(feed_of(arrays), training=False)
        except Exception:  # too small for this network: the next size
            continue
        return arrays
    return sample_inputs(model, size=_PROBE_SIZES[-1])


def sample_inputs(model, seed: int = 0, size: int = 4) -> list[np.ndarray]:
    """A fixed random batch of two for each model input; `size` for unknown dimensions."""
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = [2] + [d if d is not None else size for d in tensor.shape[1:]]
        dtype = tensor.dtype
        if dtype.is_integer:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_bool:
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        elif dtype == tf.string:  # text models (StringLookup, TextVectorization)
            words = np.array([b"a", b"b", b"c", b"dropout"], dtype=object)
            arrays.append(words[rng.integers(0, len(words), size=shape)])
        else:
            arrays.append(rng.normal(size=shape).astype(dtype.as_numpy_dtype))
    return arrays


def check_inference(old, new, inputs, *, lstm_rebuilt: bool) -> list[np.ndarray]:
    """Raises unless `new` predicts what `old` does (training=False).

    With `lstm_rebuilt` (an LSTM rebuilt with recurrent dropout, whose kernel
    then changes), outputs equal up to float rounding pass too.

    Returns:
        The new model's outputs (the reference for a Keras 3 conversion).
    """
    feed = tf.nest.pack_sequence_as(old._nested_inputs, inputs)
    expected = [np.asarray(t) for t in tf.nest.flatten(old(feed, training=False))]
    got = [np.asarray(t) for t in tf.nest.flatten(new(feed, training=False))]
    worst, close = compare_outputs(expected, got)
    if worst == 0 or (close and lstm_rebuilt):  # terms.LSTM_KERNEL warned about this
        return got
    raise UnsupportedModelError(
        "Refusing to write the rewritten model: its inference differs from the "
        f"input's (max abs difference {worst:.3g}). Expected equal outputs with "
        "training=False. Please report this model."
    )


# -- saving ---------------------------------------------------------------


def save(model, output: Path, *, overwrite: bool) -> None:
    """Saves atomically at `output`: `.h5` as a file, anything else as a SavedModel.

    A link at `output` is replaced, never written through (`regularize.core.atomic`).
    """
    if os.path.lexists(output) and not overwrite:
        raise ModelSaveError(
            f"Cannot write model to {str(output)!r}: it already exists. "
            "Pass `overwrite=True` to replace it."
        )
    h5 = output.suffix in (".h5", ".hdf5")

    def check(tmp: str) -> None:
        _check_reloads(model, Path(tmp), output)

    try:
        if h5:
            atomic.write_file(output, lambda tmp: model.save(tmp, save_format="h5"), check=check)
        else:
            save = lambda tmp: model.save(tmp, save_format="tf")  # noqa: E731
            atomic.write_folder(output, save, check=check)
    except ModelSaveError:
        raise
    except Exception as err:
        raise ModelSaveError(f"Cannot write model to {str(output)!r}: {_first_line(err)}") from err


def _check_reloads(model, file: Path, shown: Path) -> None:
    """Raises `ModelSaveError` if the file just written at `file` would not load again.

    Loaded the way this engine reads its inputs (a SavedModel rebuilt from
    its config and variables), with the classes `model` is made of in scope:
    a file that only loads with code this process happens to have is never
    published.
    """
    classes = {type(layer).__name__: type(layer) for layer in all_layers(model)}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tf_keras.utils.custom_object_scope(classes))
            if _mentions(file, TFMOT_CLASSES):
                for scope in _tfmot_scopes():
                    stack.enter_context(scope)
            if file.is_dir():
                _load_savedmodel(file)
            else:
                tf_keras.models.load_model(str(file), compile=False)
    except Exception as err:  # tf_keras raises many types; one line here
        text = str(err)
        # tf_keras: "Error when deserializing class 'X' using config=...
        # Exception encountered: <the cause>".
        name = re.search(r"deserializing class '([\w.]+)'", text)
        cause = re.search(r"Exception encountered: (.+)", text)
        why = cause.group(1) if cause else _first_line(err)
        what = f"class {name.group(1)!r} cannot be rebuilt from its saved config" if name else ""
        raise ModelSaveError(
            f"Cannot write model to {str(shown)!r}: the written file would not load again: "
            f"{what or 'loading it failed'} ({why.strip().rstrip('.')[:300]}); nothing was "
            "written. Expected a model Keras 2 can rebuild from its saved config. "
            f"Received: model {model.name!r}"
        ) from err
