"""Loading a model from a file, and saving one atomically.

Every failure becomes one `ModelLoadError` / `ModelSaveError` line that says
what is wrong, what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
import zipfile
from pathlib import Path

import h5py
import keras

from regularize.core import atomic
from regularize.core import custom_objects
from regularize.core import inputs
from regularize.core import preset_folder
from regularize.core import safety
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.errors import RegularizeError
from regularize.core.errors import RegularizeWarning
from regularize.core.errors import first_line as _first_line
from regularize.core.guards import recursion_limit
from regularize.core.paths import check_output_path
from regularize.keras3 import applications
from regularize.keras3 import training
from regularize.keras3 import trust

EXPECTED = inputs.EXPECTED
_STARTED = time.time()  # temporary files older than this process may be stale
# Keras (de)serializes functional graphs recursively, one frame per node on
# the longest path: allow models far deeper than the 2,000-layer target.
DEEP = 20_000


def load_model(
    path: str | os.PathLike,
    *,
    custom_objects: dict | str | os.PathLike | None = None,
    safe_mode: bool = True,
    compile: bool = True,
    **application_options,
) -> keras.Model:
    """Loads a Keras 3 `.keras` file, a Keras `.h5` file or a keras-hub preset, or builds a
    Keras Application.

    Args:
        path: The model file; a keras-hub preset folder (what `save_to_preset`
            writes) or handle ("bert_base_en", "kaggle://...", "hf://...",
            downloaded by keras-hub), checked as data before keras-hub reads it
            (see `regularize.keras3.hub_preset`); or a Keras Application by name, e.g.
            "keras.applications.ResNet50" (a file of that name wins).
        custom_objects: A dict of custom classes, or the path of a Python file
            or the name of a module that defines (or registers) them.
        safe_mode: Refuse Python-lambda `Lambda` layers (Keras' own guard).
        compile: Compile the model with the compile config saved with it.
            For `.keras` files the optimizer starts fresh and unbuilt (its
            saved state is not restored): no slot variables are made until
            training starts.
        **application_options: For a Keras Application only: `weights`
            ("imagenet", the default; None; or a weights file), `include_top`,
            `input_shape`, `classes`, and its other arguments (see
            `regularize.keras3.applications.load_application`).

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: The path is missing, empty, not a model, corrupt, or
            needs custom objects or `safe_mode=False`; the Application cannot
            be built; Application options given with a model file.

    Example:
        >>> base = regularize.load_model(
        ...     "keras.applications.ResNet50", weights=None, include_top=False,
        ...     input_shape=(160, 160, 3))
    """
    if applications.is_application_name(path) and not Path(path).exists():
        return applications.load_application(path, **application_options)
    if application_options:
        given = ", ".join(f"{k}={v!r}" for k, v in application_options.items())
        raise ModelLoadError(
            "Cannot read model: Application options apply only to a "
            "`keras.applications.NAME` input, not to a model file. "
            f"Received: path={str(path)!r}, {given}"
        )
    from regularize.keras3 import mc_layers  # noqa: F401  registers the MC dropout layers of `--mc` files

    if preset_folder.is_preset_folder(path) or (
        not os.path.lexists(path) and preset_folder.is_handle(path)
    ):
        from regularize.keras3 import hub_preset

        return hub_preset.load_preset(
            path, custom_objects=_custom_objects(custom_objects), safe_mode=safe_mode
        )
    path = Path(path)
    inputs.check_readable(path)
    objects = _custom_objects(custom_objects)
    # Keras would compile a `.keras` model *and* build its optimizer (Adam:
    # two slot variables per weight); compile it here from the saved config
    # instead. Legacy `.h5` files keep Keras' own path.
    lazy = compile and path.suffix == ".keras"
    # The config is checked as data before Keras deserializes anything:
    # Keras' own `safe_mode` refuses Python lambdas only, while a registered
    # object of any installed package (keras-hub's) would be resolved and run.
    try:
        trust.check_file(path, custom_objects=objects, safe_mode=safe_mode)
    except RegularizeError:
        raise
    except Exception as err:  # a damaged archive or attribute table: one line
        raise ModelLoadError(_explain_load_error(path, err)) from err
    try:
        with recursion_limit(DEEP), keras.saving.custom_object_scope(objects):
            model = _load(path, compile=compile and not lazy, safe_mode=safe_mode)
            if lazy and isinstance(model, keras.Model):
                training.compile_from_config(model, _saved_compile_config(path))
    except Exception as err:  # Keras raises many types; one line each here
        raise ModelLoadError(_explain_load_error(path, err)) from err
    inputs.check_is_model(
        model,
        keras.Model,
        what=str(path),
        noun="a model",
        expected=f"{EXPECTED} holding a model",
        received=f"Received: path={str(path)!r}",
    )
    return model


def _load(path: Path, *, compile: bool, safe_mode: bool):
    """`keras.saving.load_model`, uncompiled if only the compile config fails.

    Keras 3 cannot read every Keras 2 `.h5` compile config (`loss="mse"`,
    loss objects: "Could not deserialize 'keras.metrics.mse'"), while the
    model itself loads; a missing custom layer fails both ways.
    """
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    except Exception as err:
        if not compile:
            raise
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
        except Exception:
            raise err from None
        warnings.warn(
            f"the compile config of {path.name} does not load in Keras 3 "
            f"({_first_line(err)}): the model is not compiled; compile it before fitting",
            RegularizeWarning,
            stacklevel=3,
        )
        return model


def save_model(model: keras.Model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Saves `model` atomically: the file at `path` is whole or absent.

    The model is written to a temporary file beside `path` and renamed over
    it, so an interrupted run never leaves a partial model at `path`. A
    process killed outright (SIGKILL, power loss) cannot remove its
    temporary file; the next save to the same `path` removes it.

    Before the rename, the written file is checked to load again with the
    classes `model` is made of (see `check_reloads`): a file Keras could not
    read back is never published.

    Raises:
        ModelSaveError: Wrong suffix, missing folder, existing file without
            `overwrite`, the write failed, or the file would not load again.
    """
    path = Path(path)
    check_output_path(path, overwrite=overwrite)
    _remove_stale_temps(path)
    try:
        with recursion_limit(DEEP):
            atomic.write_file(
                path,
                lambda tmp: _write(model, tmp),
                check=lambda tmp: check_reloads(model, tmp, shown=path),
            )
    except BaseException as err:
        if isinstance(err, ModelSaveError):
            raise
        if isinstance(err, Exception):
            raise ModelSaveError(f"Cannot write model to {str(path)!r}: {_os_error(err)}") from err
        raise
    return path


def _write(model: keras.Model, tmp: str) -> None:
    if not tmp.endswith(".h5"):
        model.save(tmp)
        return
    # HDF5 writing to a path of its own kills the process (SIGSEGV in
    # `File.flush`) when a write fails, e.g. on a full disk; through a Python
    # file object the failure is an ordinary OSError. `model.save` takes paths
    # only, hence Keras' own legacy writer.
    from keras.src.legacy.saving import legacy_h5_format

    with open(tmp, "wb") as stream, h5py.File(stream, "w") as f:
        legacy_h5_format.save_model_to_hdf5(model, f)


def check_reloads(model: keras.Model, file: str | os.PathLike, *, shown=None) -> None:
    """Raises `ModelSaveError` if the model file at `file` would not load again.

    The classes `model` is made of are in scope, as the custom objects its
    input needed would be. A `.keras` file of core Keras classes only has
    each layer rebuilt from its saved config, without weights or wiring
    (cheap: a quarter of a second for ResNet50); a file with other classes
    (keras-hub models, custom layers) and every `.h5` file is loaded whole.

    Args:
        model: The model that was written.
        file: The written file.
        shown: The path to name in the message (the final output, not the
            temporary file); `file` if None.
    """
    file = Path(file)
    shown = Path(shown) if shown is not None else file
    config = _saved_model_config(file)
    with keras.saving.custom_object_scope(_classes_of(model)):
        if config is not None and _is_core(config):
            failure = _failing_layer(config)
        else:
            failure = _failing_load(model, file)
    if failure is not None:
        name, why = failure
        raise ModelSaveError(
            f"Cannot write model to {str(shown)!r}: the written file would not load again: "
            f"class {name!r} cannot be rebuilt from its saved config ({why.rstrip('.')}); "
            "nothing was written. "
            f"Expected a model whose saved config Keras can rebuild. "
            f"Received: model {model.name!r} of class {type(model).__name__!r}"
        )


def _saved_model_config(file: Path) -> dict | None:
    """The model config in a `.keras` file (None for `.h5`: it is loaded whole)."""
    if file.suffix != ".keras":
        return None
    with zipfile.ZipFile(file) as archive:
        return json.loads(archive.read("config.json"))


def _classes_of(model: keras.Model) -> dict:
    """Every class `model` is made of, by registered and by plain name."""
    classes = {}
    for layer in model._flatten_layers(include_self=True):
        cls = type(layer)
        classes[cls.__name__] = cls
        classes[keras.saving.get_registered_name(cls)] = cls
    return classes


def _is_core(config) -> bool:
    """Whether every object in a serialized config is a core Keras one."""
    if isinstance(config, dict):
        module = config.get("module")
        if isinstance(module, str) and module != "keras" and not module.startswith("keras."):
            return False
        return all(_is_core(value) for value in config.values())
    if isinstance(config, list):
        return all(_is_core(value) for value in config)
    return True


_GRAPH_CLASSES = ("Functional", "Sequential", "Model")
_DESERIALIZED_KEYS = ("module", "class_name", "config", "registered_name")


def _failing_layer(config: dict) -> tuple[str, str] | None:
    """(class name, error) of the first layer that its config does not rebuild."""
    inner = config.get("config") or {}
    if config.get("class_name") in _GRAPH_CLASSES and isinstance(inner.get("layers"), list):
        for layer in inner["layers"]:
            failure = _failing_layer(layer)
            if failure is not None:
                return failure
        return None
    if config.get("class_name") == "Lambda":
        return None  # its function is Keras' own business (and `safe_mode`'s)
    try:
        keras.saving.deserialize_keras_object(
            {key: config[key] for key in _DESERIALIZED_KEYS if key in config}
        )
    except Exception as err:  # any failure to rebuild is the answer
        return str(config.get("class_name")), _deserialization_failure(err)[1]
    return None


def _failing_load(model: keras.Model, file: Path) -> tuple[str, str] | None:
    """(class name, error) if `file` does not load whole; None if it does."""
    # A Python-function `Lambda` needs `safe_mode=False` to load; it is the
    # model's own function, already in this process.
    unsafe = any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())
    try:
        keras.saving.load_model(file, compile=False, safe_mode=not unsafe)
    except Exception as err:  # any failure to load is the answer
        name, why = _deserialization_failure(err)
        return name or "?", why
    return None


# Keras names the innermost class that failed last in a nested message.
_FAILED_CLASS = (
    re.compile(r"<class '(?:[\w.]+\.)?(\w+)'> could not be deserialized"),
    re.compile(r"Error when deserializing class '(\w+)'"),
)


def _deserialization_failure(err: Exception) -> tuple[str | None, str]:
    """(the innermost class Keras names, the cause) of a deserialization error."""
    text = str(err)
    names = [name for pattern in _FAILED_CLASS for name in pattern.findall(text)]
    name = names[-1] if names else _unknown_class(text)
    if "Exception encountered:" not in text:
        return name, f"{type(err).__name__}: {_first_line(err)}"
    # The cause comes last, after Keras' advice and the whole config.
    cause = " ".join(text.rsplit("Exception encountered:", 1)[-1].split())
    return name, cause[:300]


def _remove_stale_temps(path: Path) -> None:
    """Removes temporary files that killed earlier saves to `path` left behind.

    Only this tool's own names for this very `path` are touched
    (`.<stem>.<pid>.<random>.tmp<suffix>`), and only those whose process is
    gone and that are older than this process: a save running at the same
    time keeps its file.
    """
    own = atomic.temp_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = own.fullmatch(entry.name)
        if match is None or _is_running(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < _STARTED:
                os.unlink(entry.path)


def _is_running(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # on Windows, os.kill(pid, 0) would end the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True


def _os_error(err: BaseException) -> str:
    """An OS error's own words without the temporary file's name; else the first line."""
    if isinstance(err, OSError) and err.strerror and err.errno:
        return err.strerror
    return _first_line(err)


def _saved_compile_config(path: Path) -> dict | None:
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    return config.get("compile_config")


def _explain_load_error(path: Path, err: Exception) -> str:
    text = str(err)
    received = f"Received: path={str(path)!r}"
    refusal = safety.safe_mode_refusal(text, received)
    if refusal:
        return refusal
    if isinstance(err, zipfile.BadZipFile):
        return (
            f"Cannot read model: corrupt `.keras` archive ({_first_line(err)}). "
            f"Expected {EXPECTED}. {received}"
        )
    name = _unknown_class(text)
    if name:
        return (
            f"Cannot read model: it uses the custom object {name!r}, which is not defined "
            "here (a custom layer or function, or a class of a newer Keras). Pass "
            f"`custom_objects`: the module or `.py` file that defines it. {received}"
        )
    if isinstance(err, json.JSONDecodeError):
        return (
            f"Cannot read model: its model config is not valid JSON ({_first_line(err)}); "
            f"the file is corrupt or was edited by hand. Expected {EXPECTED}. {received}"
        )
    if text.startswith("A total of") and "could not be loaded" in text:
        # Keras lists the failing layers on later lines; the first is the why.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = lines[1].split(" Target variable:")[0] if len(lines) > 1 else lines[0]
        layer = re.search(r"object <(\w+) name=([^,>]+)", lines[0])
        where = f"layer {layer.group(2)!r} ({layer.group(1)}): " if layer else ""
        return (
            "Cannot read model: the saved weights do not fit the architecture in the "
            f"model config ({where}{' '.join(detail.split()).rstrip('.')}); the file is "
            f"corrupt or was edited by hand. {received}"
        )
    return f"Cannot read model: {type(err).__name__}: {_first_line(err).rstrip('.')}. {received}"


_UNKNOWN_CLASS = (
    r"Could not locate (?:class|function) '([^']+)'",
    r"Could not deserialize '([^']+)' because it is not a KerasSaveable subclass",
    r"Unknown (?:layer|object|activation|loss|metric|optimizer|initializer|"
    r"regularizer|constraint)\w*: '([^']+)'",
)


def _unknown_class(text: str) -> str | None:
    """The class or function name from Keras' "unknown object" messages."""
    for pattern in _UNKNOWN_CLASS:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def _custom_objects(spec) -> dict:
    """Turns a dict, a module name or a `.py` path into a custom-object dict."""
    if isinstance(spec, dict):
        return spec
    return custom_objects.load(spec)
