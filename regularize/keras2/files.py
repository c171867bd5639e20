"""The Keras 2 engine's input checks in the parent: what a file is, what it may import.

Reads HDF5 attributes and folders with h5py and the file system only: no TensorFlow,
no Keras. `check_model_file` is the parent's pre-load check (the shared checker in
`regularize.core.checker`, run before a child starts); `refuse_keras3` says why a
model cannot become a Keras 3 one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from regularize.core import safety
from regularize.core.errors import ModelLoadError
from regularize.core.errors import UnsupportedModelError
from regularize.core.errors import first_line as _first_line
from regularize.core.kinds import EXPECTED as _EXPECTED
from regularize.core.kinds import H5_SUFFIXES
from regularize.core.kinds import KERAS2_ONLY_CLASSES
from regularize.core.kinds import TFMOT_CLASSES
from regularize.core.kinds import h5_config_text as _h5_config_text


def check_input(path: Path) -> None:
    received = f"Received: path={str(path)!r}"
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as err:  # a name too long, ...
        raise ModelLoadError(
            f"Cannot read model: {err.strerror or err}. Expected {_EXPECTED}. {received}"
        ) from err
    if not exists:
        raise ModelLoadError(
            f"Cannot read model: no such file or folder. Expected {_EXPECTED}. {received}"
        )
    if is_dir:
        if not (path / "saved_model.pb").is_file():
            raise ModelLoadError(
                "Cannot read model: the folder is not a SavedModel (it has no "
                f"`saved_model.pb`). Expected {_EXPECTED}. {received}"
            )
        if not (path / "keras_metadata.pb").is_file():
            raise ModelLoadError(
                "Cannot read model: the SavedModel holds no Keras model (no "
                "`keras_metadata.pb`; written by `tf.saved_model.save` or Keras 3 "
                "`model.export()`), so there is no layer graph to rewrite. "
                f"Expected {_EXPECTED}. {received}"
            )
        return
    if path.suffix not in H5_SUFFIXES:
        raise ModelLoadError(
            f"Cannot read model: unsupported file type {path.suffix or '(none)'!r}. "
            f"Expected {_EXPECTED}. {received}"
        )
    try:
        _h5_config_text(path)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"Cannot read model: not a readable HDF5 model ({_first_line(err)}). "
            f"Expected {_EXPECTED}. {received}"
        ) from err


def check_model_file(
    path: Path, *, unsafe: bool, custom_objects=None, modules: frozenset[str] | None = None
) -> None:
    """Raises `ModelLoadError` if loading this Keras 2 model would run code or read files.

    Reads the file as data only (h5py, or `keras_metadata.pb` decoded by
    hand) and applies `regularize.core.safety`: the parent calls it before a
    child is started, the child again before tf_keras sees the file.
    """
    path = Path(path)
    received = f"Received: path={str(path)!r}"
    module = _custom_module_name(custom_objects)
    if path.is_dir():
        metadata, _ = safety.savedmodel_root_config(path)
        safety.check_keras2_config(
            metadata, received, unsafe=unsafe, custom_module=module, modules=modules, root=path
        )
        config = metadata.get("config")
        if not unsafe and not (isinstance(config, dict) and metadata.get("class_name")):
            raise ModelLoadError(
                "Refusing to load model: the SavedModel keeps no config for its model "
                f"(class {metadata.get('class_name')!r}), only traced graph functions, and "
                "loading those runs the SavedModel's own graph code. Expected a Keras 2 "
                f"SavedModel of a Functional or Sequential model. {safety.UNSAFE_HINT} "
                f"{received}"
            )
        return
    safety.check_h5_storage(path, received)
    config = safety.parse_config(_h5_config_text(path)[1], received)
    safety.check_keras2_config(
        config, received, unsafe=unsafe, custom_module=module, modules=modules
    )


def _custom_module_name(spec) -> str | None:
    if not spec:
        return None
    text = str(spec)
    return Path(text).stem if text.endswith(".py") or os.sep in text else text


def module_folder(name: str) -> str | None:
    """The `sys.path` folder the module `name` would be imported from, found without importing it.

    The child starts isolated (no working folder on its path), so the folder
    of a custom-object module the user named goes along explicitly.
    """
    import importlib.machinery

    try:
        # Where `custom_objects.load` would find it: the import path, then
        # the working folder (last).
        where = [*sys.path, os.getcwd()]
        spec = importlib.machinery.PathFinder.find_spec(name.split(".")[0], where)
    except (ImportError, ValueError, OSError):
        return None
    if spec is None or not spec.origin or not os.path.isabs(spec.origin):
        return None
    origin = Path(spec.origin)
    return str(origin.parent.parent if origin.name == "__init__.py" else origin.parent)


def refuse_keras3(classes) -> None:
    """Raises `UnsupportedModelError` if layer `classes` cannot exist in Keras 3."""
    found = set(classes) & TFMOT_CLASSES
    if found:
        # Each wrapper kind has its own way out, or none (QAT).
        advice = []
        for kind, names, way in _TFMOT_KINDS:
            if found & names:
                advice.append(f"{kind} wrappers ({', '.join(sorted(found & names))}): {way}")
        ways = "; ".join(advice)
        raise UnsupportedModelError(
            "Cannot convert to Keras 3: the model has tensorflow-model-optimization "
            f"wrappers, and Keras 3 has no tfmot. {ways[0].upper()}{ways[1:]}. Expected a model "
            "without tfmot wrappers, or a Keras 2 output (`to_keras3=False`)."
        )
    found = sorted(set(classes) & KERAS2_ONLY_CLASSES)
    if found:
        raise UnsupportedModelError(
            f"Cannot convert to Keras 3: the model has {', '.join(found)} layers, which "
            "Keras 3 does not have (`TFOpLambda`: a `tf.*` call recorded by Keras 2). "
            "Expected a Keras 2 output (`to_keras3=False`)."
        )


# The tfmot wrapper kinds, and what turns a model of each into plain layers.
_TFMOT_KINDS = (
    (
        "pruning",
        frozenset({"PruneLowMagnitude"}),
        "remove them with `tfmot.sparsity.keras.strip_pruning` after pruning",
    ),
    (
        "clustering",
        frozenset({"ClusterWeights", "ClusterWeightsMHA"}),
        "remove them with `tfmot.clustering.keras.strip_clustering` after clustering",
    ),
    (
        "quantization-aware training",
        frozenset({"QuantizeAnnotate", "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"}),
        "no tfmot function removes them, so a QAT model cannot become a Keras 3 model "
        "(it stays a Keras 2 model; the TFLite converter takes it from there)",
    ),
)
