"""Loading a model from a file, and saving one atomically.

Every failure becomes one `ModelLoadError` / `ModelSaveError` line that says
what is wrong, what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import h5py
import keras

from regularize import graph
from regularize import training
from regularize.errors import ModelLoadError
from regularize.errors import ModelSaveError
from regularize.paths import check_output_path

EXPECTED = "a `.keras` file or a Keras `.h5` file"
# Keras (de)serializes functional graphs recursively, one frame per node on
# the longest path: allow models far deeper than the 2,000-layer target.
DEEP = 20_000


def load_model(
    path: str | os.PathLike,
    *,
    custom_objects: dict | str | os.PathLike | None = None,
    safe_mode: bool = True,
    compile: bool = True,
) -> keras.Model:
    """Loads a Keras 3 `.keras` file or a Keras `.h5` file.

    Args:
        path: The model file.
        custom_objects: A dict of custom classes, or the path of a Python file
            or the name of a module that defines (or registers) them.
        safe_mode: Refuse Python-lambda `Lambda` layers (Keras' own guard).
        compile: Compile the model with the compile config saved with it.
            For `.keras` files the optimizer starts fresh and unbuilt (its
            saved state is not restored): no slot variables are made until
            training starts.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: The path is missing, empty, not a model, corrupt, or
            needs custom objects or `safe_mode=False`.
    """
    path = Path(path)
    _check_readable(path)
    objects = _custom_objects(custom_objects)
    # Keras would compile a `.keras` model *and* build its optimizer (Adam:
    # two slot variables per weight); compile it here from the saved config
    # instead. Legacy `.h5` files keep Keras' own path.
    lazy = compile and path.suffix == ".keras"
    try:
        with graph.recursion_limit(DEEP), keras.saving.custom_object_scope(objects):
            model = keras.saving.load_model(path, compile=compile and not lazy, safe_mode=safe_mode)
            if lazy and isinstance(model, keras.Model):
                training.compile_from_config(model, _saved_compile_config(path))
    except Exception as err:  # Keras raises many types; one line each here
        raise ModelLoadError(_explain_load_error(path, err)) from err
    if not isinstance(model, keras.Model):
        raise ModelLoadError(
            f"Cannot read model: {path} holds a {type(model).__name__}, not a model. "
            f"Expected {EXPECTED} holding a model. Received: path={str(path)!r}"
        )
    return model


def save_model(model: keras.Model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Saves `model` atomically: the file at `path` is whole or absent.

    The model is written to a temporary file beside `path` and renamed over
    it, so an interrupted run never leaves a partial model at `path`.

    Raises:
        ModelSaveError: Wrong suffix, missing folder, existing file without
            `overwrite`, or the write failed.
    """
    path = Path(path)
    check_output_path(path, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        with graph.recursion_limit(DEEP):
            model.save(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain
        # `open()` would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception):
            raise ModelSaveError(
                f"Cannot write model to {str(path)!r}: {_first_line(err)}"
            ) from err
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _saved_compile_config(path: Path) -> dict | None:
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    return config.get("compile_config")


def _check_readable(path: Path) -> None:
    received = f"Received: path={str(path)!r}"
    if not path.exists():
        raise ModelLoadError(f"Cannot read model: no such file. Expected {EXPECTED}. {received}")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            raise ModelLoadError(
                "Cannot read model: SavedModel folders are not supported yet. "
                f"Expected {EXPECTED}. {received}"
            )
        raise ModelLoadError(f"Cannot read model: it is a folder. Expected {EXPECTED}. {received}")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(
            f"Cannot read model: the file is empty (0 bytes). Expected {EXPECTED}. {received}"
        )
    if path.suffix == ".keras":
        _check_keras_archive(path, received)
    elif path.suffix in (".h5", ".hdf5"):
        _check_h5(path, received)
    else:
        raise ModelLoadError(
            f"Cannot read model: unsupported file type {path.suffix or '(none)'!r}. "
            f"Expected {EXPECTED}. {received}"
        )


def _check_keras_archive(path: Path, received: str) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            "Cannot read model: not a `.keras` archive (not a zip file, or a "
            f"truncated one). Expected {EXPECTED}. {received}"
        )
    # No `testzip()` here: it reads the whole archive once more, and Keras'
    # own reads check every member's CRC anyway.
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelLoadError(
            f"Cannot read model: corrupt `.keras` archive ({_first_line(err)}). "
            f"Expected {EXPECTED}. {received}"
        ) from err
    if "config.json" not in names:
        raise ModelLoadError(
            "Cannot read model: the zip archive has no `config.json`, so it is not "
            f"a Keras model. Expected {EXPECTED}. {received}"
        )


def _check_h5(path: Path, received: str) -> None:
    if not h5py.is_hdf5(path):
        raise ModelLoadError(
            f"Cannot read model: not an HDF5 file. Expected {EXPECTED}. {received}"
        )
    try:
        with h5py.File(path, "r") as f:
            has_config = "model_config" in f.attrs
    except OSError as err:
        raise ModelLoadError(
            f"Cannot read model: corrupt HDF5 file ({_first_line(err)}). "
            f"Expected {EXPECTED}. {received}"
        ) from err
    if not has_config:
        raise ModelLoadError(
            "Cannot read model: the `.h5` file holds weights only, no model "
            "config. Rebuild the architecture in code, call `load_weights()`, "
            f"then save it as `.keras`. Expected {EXPECTED}. {received}"
        )


def _explain_load_error(path: Path, err: Exception) -> str:
    text = str(err)
    received = f"Received: path={str(path)!r}"
    if "safe_mode" in text:
        return (
            "Refusing to load a model with a Python-lambda `Lambda` layer: it runs "
            "arbitrary code. If you trust the file, pass --unsafe "
            f"(safe_mode=False). {received}"
        )
    if isinstance(err, zipfile.BadZipFile):
        return (
            f"Cannot read model: corrupt `.keras` archive ({_first_line(err)}). "
            f"Expected {EXPECTED}. {received}"
        )
    match = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if match:
        return (
            f"Cannot read model: it uses the custom object {match.group(1)!r}, which "
            "is not defined here. Pass --custom-objects with the module or `.py` "
            f"file that defines it (custom_objects=...). {received}"
        )
    return f"Cannot read model: {type(err).__name__}: {_first_line(err)}. {received}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[0].split())


def _custom_objects(spec) -> dict:
    """Turns a dict, a module name or a `.py` path into a custom-object dict."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return spec
    text = str(spec)
    try:
        if text.endswith(".py") or os.sep in text:
            file = Path(text)
            if not file.is_file():
                raise ModelLoadError(
                    "Cannot read custom objects: no such file. Expected a `.py` file "
                    f"or an importable module name. Received: custom_objects={text!r}"
                )
            name = f"regularize_custom_{abs(hash(file.resolve()))}"
            module_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(text)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"Cannot read custom objects from {text!r}: {type(err).__name__}: {_first_line(err)}"
        ) from err
    # Classes and functions defined in the module; registered ones
    # (`@keras.saving.register_keras_serializable`) are found by Keras anyway.
    return {
        name: obj
        for name, obj in vars(module).items()
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not name.startswith("_")
    }
