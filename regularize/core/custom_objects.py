"""Custom layers from a `.py` file or a module name, for `--custom-objects`.

Imports no Keras: the Keras 3 loader (`regularize.keras3.io`) and the Keras 2
engine's child process (`regularize.keras2.engine`) both use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from regularize.core.errors import ModelLoadError
from regularize.core.errors import first_line


def load(spec: str | os.PathLike | None) -> dict:
    """Classes and functions defined in a `.py` file or a module (None: none).

    Registered classes (`register_keras_serializable`) are found by Keras
    anyway; the others are passed to the loader by name.

    Raises:
        ModelLoadError: The file is missing, or importing it fails.
    """
    if not spec:
        return {}
    text = str(spec)
    # Nothing is written beside the user's module (no `__pycache__`): the
    # tool writes only its output.
    no_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return _load(text)
    finally:
        sys.dont_write_bytecode = no_bytecode


def _load(text: str) -> dict:
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
            module = _import_named(text)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"Cannot read custom objects from {text!r}: {type(err).__name__}: {first_line(err)}"
        ) from err
    return {
        name: obj
        for name, obj in vars(module).items()
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not name.startswith("_")
    }


def _import_named(name: str):
    """Imports the module the user named, also from the working folder.

    The working folder is not on this program's import path (a `json.py`
    beside a model must not be imported), but a module the user names is
    looked for there too, last: it shadows nothing installed, and it is on
    the path only while that one module is imported.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err
        if err.name != name.split(".")[0]:
            raise
    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed
        raise missing from None
    if cwd in sys.path or "" in sys.path:
        raise missing  # already looked there
    sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(cwd)
