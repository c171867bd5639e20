"""Checks of a Keras 3 input file that need no TensorFlow: the CLI runs them first.

`regularize.keras3.io.load_model` runs them too, before Keras reads the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py

from regularize.core import preset_folder
from regularize.core import safety
from regularize.core.errors import ModelLoadError
from regularize.core.errors import first_line as _first_line

EXPECTED = "a `.keras` file or a Keras `.h5` file"


def check_is_model(
    loaded: object, model_class: type, *, what: str, noun: str, expected: str, received: str
) -> None:
    """Raises `ModelLoadError` if what an engine loaded is not a `model_class` (both engines).

    A file may hold a layer, a function or plain data that the engine loads
    without complaint: `what` (the path, or "it") "holds a X, not `noun`".
    """
    if not isinstance(loaded, model_class):
        raise ModelLoadError(
            f"Cannot read model: {what} holds a {type(loaded).__name__}, not {noun}. "
            f"Expected {expected}. {received}"
        )


def check_readable(path: Path) -> None:
    """Raises `ModelLoadError` unless `path` looks like a model file Keras 3 can read.

    Only the container is read (zip directory, HDF5 attributes and links), so
    this runs before TensorFlow is imported: a wrong file is reported at once.
    """
    received = f"Received: path={str(path)!r}"
    if not path.exists():
        raise ModelLoadError(f"Cannot read model: no such file. Expected {EXPECTED}. {received}")
    if preset_folder.is_preset_folder(path):
        # Its files are checked by `regularize.keras3.hub_preset`, before keras-hub reads them.
        return
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            raise ModelLoadError(
                "Cannot read model: Keras 3 cannot load a SavedModel folder; the "
                "`regularize` command (or `regularize.keras2.run`) rewrites Keras 2 "
                f"SavedModels. Expected {EXPECTED}. {received}"
            )
        raise ModelLoadError(
            "Cannot read model: it is a folder, and neither a SavedModel (no `saved_model.pb`) "
            "nor a keras-hub preset (no `config.json`). "
            f"Expected {EXPECTED}. {received}"
        )
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
    except Exception as err:  # BadZipFile, OSError, EOFError, UnicodeDecodeError, ...
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
    except Exception as err:  # h5py: OSError, or RuntimeError for a damaged attribute table
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
    # Keras copies whatever the datasets hold into the model, and HDF5 can
    # keep a dataset's bytes in any other local file.
    safety.check_h5_storage(path, received)
